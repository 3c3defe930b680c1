# vramplan: the planner, its CLI and the web app. Catalog models plan without torch, so the
# image stays small; add the `introspect` extra to plan from pasted config.json files.
FROM node:22-slim AS assets
WORKDIR /assets
COPY package.json package-lock.json ./
RUN npm ci --omit=dev

# the wheel, built from the source without build isolation, so setuptools is the pinned one
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY app ./app
COPY planner ./planner
COPY gpu_catalog ./gpu_catalog
COPY launcher ./launcher
COPY templates ./templates
COPY static ./static
RUN pip install --no-cache-dir -c constraints.txt build setuptools \
    && python -m build --wheel --no-isolation --outdir /dist

FROM python:3.11-slim
WORKDIR /srv/vramplan
# the wheel, not the source: it carries the templates and static files (app/templates,
# app/static); pinned versions. This image plans; to launch runs from it, install the `launch`
# extra too (torch, TRL: several GB).
COPY constraints.txt /tmp/constraints.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir -c /tmp/constraints.txt "$(ls /tmp/dist/vramplan-*.whl)[web]" \
    && rm -rf /tmp/dist /tmp/constraints.txt
# htmx, its SSE extension and Swagger UI from the Node stage; app/templating.py looks here first
COPY --from=assets /assets/node_modules /opt/vramplan/node_modules
ENV VRAMPLAN_NODE_MODULES=/opt/vramplan/node_modules
# Inside a container the server must listen on 0.0.0.0 to be reachable through -p; it still
# answers only to the Host names below (add yours, e.g. -e VRAMPLAN_ALLOWED_HOSTS=plan.example.org)
# and refuses cross-site posts. Publish the port on loopback (-p 127.0.0.1:8000:8000) unless
# others should reach it. Launching runs needs the token `serve` prints with its sign-in URL;
# mount the data directory (-v vramplan-data:/root/.local/share/vramplan) to keep it and the runs.
ENV VRAMPLAN_ALLOWED_HOSTS=localhost,127.0.0.1,::1
EXPOSE 8000
ENTRYPOINT ["vramplan"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
