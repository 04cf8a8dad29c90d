# syntax=docker/dockerfile:1
# Two stages: the compiler and the index build stay in the first; the image that runs has neither.
# The same image serves every role of deploy/rinha/docker-compose.yml (balancer and API instances).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# gcc and the libc headers compile the C extensions (the search core and the service's fast path).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A venv, so the runtime stage copies exactly what was installed and nothing of the build tools.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY . .
RUN pip install .
# Built once here rather than at start-up: the instances only memory-map it (~96 MB, shared page cache).
RUN fraudscore index build --references data/references.json.gz --out /opt/index/references.fsidx

FROM ${PYTHON_IMAGE} AS runtime
# /sockets is owned by the service user: a new named volume mounted there takes this ownership,
# so the instances can create their unix sockets in it without root.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin fraudscore \
 && mkdir -p /app/data /sockets \
 && chown fraudscore:fraudscore /sockets
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/index/references.fsidx /app/data/references.fsidx
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER fraudscore
EXPOSE 9999
CMD ["fraudscore", "serve", "--index", "/app/data/references.fsidx", "--port", "9999"]
