# One image for every wattflow service: the command picks the service
# (`wattflow broker`, `wattflow ingest`, ...). Built from the repo root so shared/ is copied in.
#
#   docker build -t wattflow .                                   # normal machine: python:3.11-slim, PyPI
#   docker build -t wattflow --build-arg BASE_IMAGE=wattflow-base:bookworm \
#     --build-arg PIP_INSTALL_ARGS="--no-index --find-links /wheels" .   # no registry: local base, host wheels
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG PIP_INSTALL_ARGS=""
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp \
    MPLCONFIGDIR=/opt/matplotlib \
    WATTFLOW_CONFIG=/etc/wattflow/config.yaml \
    WATTFLOW_RUNTIME_RUN_DIR=/tmp/wattflow

# `as-owner DIR COMMAND...` runs COMMAND as the uid:gid that owns DIR, with no other groups. The
# plotter starts as root with it, so it writes the charts as the owner of the host's plots folder.
RUN printf '%s\n' '#!/opt/venv/bin/python3' \
      '"""as-owner DIR COMMAND...: run COMMAND as the owner (uid:gid) of DIR; started as root."""' \
      'import os, sys' \
      'st = os.stat(sys.argv[1])' \
      'os.setgroups([])' \
      'os.setgid(st.st_gid)' \
      'os.setuid(st.st_uid)' \
      'os.execvp(sys.argv[2], sys.argv[2:])' >/usr/local/bin/as-owner \
 && chmod 755 /usr/local/bin/as-owner

# Dependencies first (their layer survives code changes); the list comes from pyproject.toml.
RUN python3 -m venv /opt/venv
COPY pyproject.toml /src/pyproject.toml
COPY wheels/ /wheels/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir ${PIP_INSTALL_ARGS} -r /tmp/requirements.txt \
 && python3 -c "import matplotlib.font_manager" \
 && chmod 1777 /opt/matplotlib && chmod -R a+r /opt/matplotlib
# ^ matplotlib's font cache, made once here: made at start instead it costs the plotter ~6 s.
#   Readable by any uid (the plotter runs as the plots folder's owner); the folder is open like /tmp.

COPY README.md /src/README.md
COPY shared/ /src/shared/
COPY services/ /src/services/
RUN pip install --no-cache-dir --no-deps ${PIP_INSTALL_ARGS} /src \
 && rm -rf /wheels /src \
 && mkdir -p /data /plots /etc/wattflow \
 && chown 10001:10001 /data /plots
COPY config.yaml /etc/wattflow/config.yaml
# compose: storage and power start through it, on the project's database (SQLite or PostgreSQL)
COPY docker/compose-db /usr/local/bin/compose-db

USER 10001:10001
WORKDIR /data
EXPOSE 44444 5550 5551 5552 5553 8080
CMD ["wattflow", "--help"]
