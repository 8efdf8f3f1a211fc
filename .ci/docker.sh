#!/usr/bin/env bash
# Docker for CI on a machine with no Docker Hub: install Debian's docker.io and debootstrap, start
# dockerd, and build a local python:3.11-slim stand-in (Debian bookworm minbase + Python 3.11, venv
# at /opt/venv on PATH, and nginx, which the image runs in front of gunicorn and could not fetch in an
# offline build) so the Dockerfile's default BASE_IMAGE resolves without a registry.
# Prints the docker CLI to use (Debian's, which has buildx; another docker first on PATH may not).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
BASE_TAG=${BASE_TAG:-python:3.11-slim}

if ! dpkg -s docker.io debootstrap >/dev/null 2>&1; then
  apt-get install -y -qq --no-install-recommends docker.io debootstrap iptables >/dev/null
fi
DOCKER=/usr/bin/docker

if ! "$DOCKER" info >/dev/null 2>&1; then
  (dockerd >/tmp/dockerd.log 2>&1 &)
  for _ in $(seq 1 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  "$DOCKER" info >/dev/null 2>&1 || { tail -20 /tmp/dockerd.log >&2; echo "dockerd did not start" >&2; exit 1; }
fi

if ! "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
  rootfs=$(mktemp -d /tmp/memfit-rootfs.XXXX)
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,nginx-light bookworm "$rootfs" \
    "${mirror:-http://deb.debian.org/debian}" >/tmp/debootstrap.log 2>&1 ||
    { tail -20 /tmp/debootstrap.log >&2; exit 1; }
  chroot "$rootfs" python3 -m venv /opt/venv
  chroot "$rootfs" /opt/venv/bin/python -m pip --version >/dev/null
  # Slim like the official image: no apt lists, docs or caches.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/var/cache/apt/*
  tar -C "$rootfs" -c . | "$DOCKER" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_TAG" >/dev/null
  rm -rf "$rootfs"
fi
echo "$DOCKER"
