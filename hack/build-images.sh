#!/usr/bin/env bash
# Builds covi's two container images, and the pod sandbox ("pause") image a node needs,
# as OCI archives from this repository's own cargo build, with no Docker engine and no
# registry: each image is one layer holding the binary, exactly the shared libraries it
# links (found with ldd, so libvirt 11 from bookworm-backports as on the build machine),
# a CA bundle and a passwd file. They match deploy/images/Dockerfile.* (same binary,
# entrypoint and user; the agent image also carries xorriso), minus the apt layers.
#
# Usage: hack/build-images.sh [--release] [--tag=TAG] [--import=CONTAINERD_SOCKET]
#   --release      build and package release binaries (default: the debug build the
#                  tests use, with its debug info stripped)
#   --tag=TAG      image tag (default: dev- and a hash of what goes into the images)
#   --import=SOCK  import the images into that containerd's k8s.io namespace
# Prints the archives' paths and image names; the last line is `tag TAG`.
# Archives are cached in .cache/images by tag: a second run costs a cargo no-op.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$COVI_ROOT"

profile=debug
tag=""
import=""
for arg in "$@"; do
  case "$arg" in
    --release) profile=release ;;
    --tag=*) tag=${arg#--tag=} ;;
    --import=*) import=${arg#--import=} ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-images: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

# The whole workspace, as hack/test.sh builds it: a subset of packages would resolve
# features differently and rebuild their dependencies.
cargo_args=(--locked --workspace --bins)
[ "$profile" = release ] && cargo_args+=(--release)
cargo build --quiet "${cargo_args[@]}"
bin="$COVI_ROOT/target/$profile"

out="$COVI_CACHE/images"
mkdir -p "$out"
if [ -z "$tag" ]; then
  tag="dev-$(cat "$bin/covi-operator" "$bin/covi-agent" "$0" | sha256sum | cut -c1-12)"
fi
REGISTRY=covi.local

# libs_of ROOT FILE: every shared library FILE links, and the dynamic loader, at their
# own paths under ROOT (symlinks resolved).
libs_of() {
  local root=$1 file=$2 lib
  for lib in $(ldd "$file" | awk '/=> \//{print $3} /^\t\//{print $1}'); do
    [ -e "$root$lib" ] && continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# add_program ROOT SOURCE DEST: SOURCE at DEST under ROOT without its debug info, and
# its libraries.
add_program() {
  local root=$1 source=$2 dest=$3
  mkdir -p "$root$(dirname "$dest")"
  objcopy --strip-debug "$source" "$root$dest"
  libs_of "$root" "$source"
}

# base_files ROOT: what a Debian image has that these programs read: users (libvirt
# looks up the user it runs as), name service configuration, CA certificates, /tmp.
base_files() {
  local root=$1 lib
  mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/var/run" "$root/run"
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
  printf '127.0.0.1 localhost\n' >"$root/etc/hosts"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/" 2>/dev/null || true
  for lib in /lib/x86_64-linux-gnu/libnss_files.so.2 /lib/x86_64-linux-gnu/libnss_dns.so.2; do
    [ -e "$lib" ] && { mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; }
  done
  echo "$tag" >"$root/etc/covi-image"
}

# oci_archive NAME TAG ROOT USER ENTRYPOINT...: ROOT as a one-layer OCI image archive
# named $REGISTRY/NAME:TAG, reproducible (sorted, owned by root, time zero).
oci_archive() {
  local name=$1 tag=$2 root=$3 user=$4
  shift 4
  local ref="$REGISTRY/$name:$tag" archive="$out/$name-$tag.oci.tar" work entry
  if [ -s "$archive" ]; then
    touch "$archive" # in use: the newest, so the pruning below keeps it
    echo "$archive $ref"
    return
  fi
  work=$(mktemp -d)
  mkdir -p "$work/layout/blobs/sha256"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$root" -cf "$work/layer.tar" .
  local diff_id layer layer_size config config_size manifest manifest_size
  diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  gzip -n -6 "$work/layer.tar"
  layer=$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)
  layer_size=$(stat -c %s "$work/layer.tar.gz")
  mv "$work/layer.tar.gz" "$work/layout/blobs/sha256/$layer"
  entry=$(printf '%s\n' "$@" | jq -R . | jq -sc .)
  jq -nc --argjson entry "$entry" --arg user "$user" --arg diff "sha256:$diff_id" '{
      architecture: "amd64", os: "linux",
      config: {User: $user, Entrypoint: $entry,
               Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
      rootfs: {type: "layers", diff_ids: [$diff]}}' >"$work/config.json"
  config=$(sha256sum "$work/config.json" | cut -d' ' -f1)
  config_size=$(stat -c %s "$work/config.json")
  mv "$work/config.json" "$work/layout/blobs/sha256/$config"
  jq -nc --arg c "sha256:$config" --argjson cs "$config_size" --arg l "sha256:$layer" --argjson ls "$layer_size" '{
      schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
      layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $l, size: $ls}]}' \
    >"$work/manifest.json"
  manifest=$(sha256sum "$work/manifest.json" | cut -d' ' -f1)
  manifest_size=$(stat -c %s "$work/manifest.json")
  mv "$work/manifest.json" "$work/layout/blobs/sha256/$manifest"
  jq -nc --arg m "sha256:$manifest" --argjson ms "$manifest_size" --arg ref "$ref" --arg tag "$tag" '{
      schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
      manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m, size: $ms,
                   platform: {architecture: "amd64", os: "linux"},
                   annotations: {"io.containerd.image.name": $ref, "org.opencontainers.image.ref.name": $tag}}]}' \
    >"$work/layout/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' >"$work/layout/oci-layout"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/layout" -cf "$archive.tmp" .
  mv "$archive.tmp" "$archive"
  rm -rf "$work"
  echo "$archive $ref"
}

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# The sandbox: a static pause, nothing else.
mkdir -p "$stage/pause"
gcc -static -Os -s -o "$stage/pause/pause" "$COVI_ROOT/hack/images/pause.c"
pause_tag="3-$(sha256sum "$COVI_ROOT/hack/images/pause.c" | cut -c1-8)"
oci_archive pause "$pause_tag" "$stage/pause" 65535:65535 /pause

# The operator: the binary and its libraries, as user 65532 like the Dockerfile.
base_files "$stage/operator"
add_program "$stage/operator" "$bin/covi-operator" /usr/local/bin/covi-operator
oci_archive covi-operator "$tag" "$stage/operator" 65532:65532 /usr/local/bin/covi-operator

# The agent: the binary, libvirt's client library, xorriso (cloud-init seed ISOs) and
# the network tools of faults.
base_files "$stage/agent"
add_program "$stage/agent" "$bin/covi-agent" /usr/local/bin/covi-agent
add_program "$stage/agent" "$(command -v xorriso)" /usr/bin/xorriso
# Faults (Disruptions): ip and tc for links and shaping, nft for partitions.
add_program "$stage/agent" "$(command -v ip)" /usr/sbin/ip
add_program "$stage/agent" "$(command -v tc)" /usr/sbin/tc
add_program "$stage/agent" "$(command -v nft)" /usr/sbin/nft
oci_archive covi-agent "$tag" "$stage/agent" 0:0 /usr/local/bin/covi-agent

# Archives of older builds: the newest four of each image stay (a branch switched back
# and forth), the rest go (37 MB each, two per build).
for name in covi-operator covi-agent; do
  { ls -t "$out/$name"-dev-*.oci.tar 2>/dev/null || true; } | tail -n +9 | xargs -r rm -f
done

if [ -n "$import" ]; then
  for archive in "$out/pause-$pause_tag.oci.tar" "$out/covi-operator-$tag.oci.tar" "$out/covi-agent-$tag.oci.tar"; do
    ctr --address "$import" -n k8s.io images import "$archive" >/dev/null
  done
  echo "imported into $import"
fi
echo "tag $tag"
