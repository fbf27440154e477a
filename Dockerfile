# touchstream engine image: `docker build -t touchstream .`
# The entry point is the `touchstream` console script, so a container's command is
# a subcommand: `run ...`, `topics create ...`, `profiles load ...`, `replay ...`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build needs (pyproject names README.md as the readme and
# lists these packages); tests, bench and the venv stay out of the image. The same
# image runs the push gateway: `touchstream gateway serve`.
WORKDIR /tmp/build
COPY pyproject.toml README.md ./
COPY flows ./flows
COPY connectors ./connectors
COPY state ./state
COPY gateway ./gateway
RUN pip install . && cd / && rm -rf /tmp/build

# Non-root runtime user. /var/lib/touchstream holds the recovery snapshots; it is
# created here, owned by that user, so a named volume mounted on it inherits the
# ownership. It is also the working directory, so relative paths land in it.
RUN groupadd --system --gid 10001 touchstream \
 && useradd --system --uid 10001 --gid touchstream \
        --home-dir /var/lib/touchstream --shell /usr/sbin/nologin touchstream \
 && mkdir -p /var/lib/touchstream \
 && chown touchstream:touchstream /var/lib/touchstream
WORKDIR /var/lib/touchstream
USER 10001:10001

ENTRYPOINT ["touchstream"]
CMD ["--help"]
