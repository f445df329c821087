# S3 for the compose test: moto's server (the compose file's SeaweedFS image cannot be pulled here).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN python3 -m venv /opt/moto && /opt/moto/bin/pip install -q --no-cache-dir 'moto[server]==5.2.5'
ENV PATH=/opt/moto/bin:$PATH
ENTRYPOINT ["moto_server"]
