#!/bin/sh
# Image layer, run inside a copy of the base rootfs (chroot, /proc mounted). The agent's wheel and
# its dependency wheels are at $WHEELS; nothing is fetched from a network here.
set -eu
export LC_ALL=C.UTF-8 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
: "${WHEELS:?}"
VENV=/opt/neuraos-agent/venv

rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --no-index --find-links "$WHEELS" neuraos-agent
"$VENV/bin/python" -c 'import neuraos_agent, grpc, google.protobuf; print("I: agent imports ok")'
test -x "$VENV/bin/neuraos-agent"

# fresh ssh host keys for this image
rm -f /etc/ssh/ssh_host_*
ssh-keygen -A
echo "I: agent installed"
