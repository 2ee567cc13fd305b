#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ API headers (Debian trixie libonnxruntime-dev 1.21.0+dfsg-1, MIT),
# pinned by sha256, without touching the system's apt setup: a private sources list naming the
# trixie suite of the Debian mirror already configured on this machine, private state and cache.
# Usage: tools/fetch_ort_headers.sh DEST   (headers land in DEST/include/onnxruntime)
set -euo pipefail
DEST=${1:?usage: fetch_ort_headers.sh DEST}
VERSION="1.21.0+dfsg-1"
SHA256="14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
if [ -f "$DEST/include/onnxruntime/onnxruntime_cxx_api.h" ]; then exit 0; fi

MIRROR=$( (cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true) \
  | grep -E '^(URIs:|deb )' | grep -v security | head -n1 | sed -E 's/^URIs:[[:space:]]*//; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//; s/[[:space:]].*$//')
if [ -z "$MIRROR" ]; then echo "fetch_ort_headers: no Debian mirror configured in apt sources" >&2; exit 1; fi
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/etc/preferences.d"
echo "deb [signed-by=$KEYRING] $MIRROR trixie main" > "$WORK/sources.list"
APT_OPTS=(-o "Dir::Etc::SourceList=$WORK/sources.list" -o "Dir::Etc::SourceParts=-"
  -o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache=$WORK/cache" -o "Dir::Etc::Preferences=$WORK/etc/preferences"
  -o "Dir::Etc::PreferencesParts=$WORK/etc/preferences.d" -o "APT::Architecture=amd64" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${APT_OPTS[@]}" -qq update
(cd "$WORK" && apt-get "${APT_OPTS[@]}" -qq download "libonnxruntime-dev=$VERSION")
DEB=$(ls "$WORK"/libonnxruntime-dev_*.deb)
echo "$SHA256  $DEB" | sha256sum -c --quiet -
dpkg-deb -x "$DEB" "$WORK/x"
mkdir -p "$DEST/include"
cp -r "$WORK/x/usr/include/onnxruntime" "$DEST/include/"
echo "ONNX Runtime headers $VERSION in $DEST/include/onnxruntime"
