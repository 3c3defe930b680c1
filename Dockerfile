# vramplan: the planner and its CLI. Catalog models plan without torch, so the image stays small;
# add the `introspect` extra to plan from arbitrary config.json files.
FROM python:3.11-slim
WORKDIR /srv/vramplan
COPY pyproject.toml README.md ./
COPY app ./app
COPY planner ./planner
COPY gpu_catalog ./gpu_catalog
RUN pip install --no-cache-dir .
ENTRYPOINT ["vramplan"]
CMD ["--help"]
