# vramplan: the planner, its CLI and the web app. Catalog models plan without torch, so the
# image stays small; add the `introspect` extra to plan from pasted config.json files.
FROM node:22-slim AS assets
WORKDIR /assets
COPY package.json package-lock.json ./
RUN npm ci --omit=dev

FROM python:3.11-slim
WORKDIR /srv/vramplan
COPY pyproject.toml README.md ./
COPY app ./app
COPY planner ./planner
COPY gpu_catalog ./gpu_catalog
COPY templates ./templates
COPY --from=assets /assets/node_modules ./node_modules
# editable, so the app finds templates/ and node_modules/ beside its package
RUN pip install --no-cache-dir -e '.[web]'
EXPOSE 8000
ENTRYPOINT ["vramplan"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
