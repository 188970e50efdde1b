#!/usr/bin/env bash
# make container-test: builds docker/Dockerfile on a Debian base made here (no image registry is needed), starts the
# image, waits for /health and checks a completion against the plain model. Run as root on Debian.
#
#   1. base image   debootstrap --variant=minbase bookworm, imported into podman as $BASE_IMAGE (once; kept)
#   2. build        podman build --build-arg BASE=$BASE_IMAGE --build-arg TORCH=<the local CPU wheel>, docker format
#                   (keeps HEALTHCHECK), chroot isolation (RUN steps need no OCI runtime)
#   3. run          podman run; where the sandbox refuses OCI runtimes (this project's VMs: crun and runc fail to set
#                   rlimits), the image's own root filesystem in a chroot instead: its USER, WORKDIR, ENV and CMD,
#                   a writable layer over it, the store on a volume, host network. What that skips is the runtime's
#                   isolation (namespaces, cgroups), nothing of the image.
#   4. check        /health 200 and /ready 200, a greedy completion equal to the plain model's tokens, /metrics,
#                   and the image's HEALTHCHECK command run inside it.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${TS_CONTAINER_WORK:-/var/tmp/ts-container}
BASE_IMAGE=${TS_CONTAINER_BASE:-localhost/tensorstream-debian-base:bookworm}
IMAGE=${TS_CONTAINER_IMAGE:-localhost/tensorstream:test}
PORT=${TS_CONTAINER_PORT:-18080}
MIRROR=${TS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-python3}
mkdir -p "$WORK"
log() { echo "container-test: $*"; }

# ---- 0. tools ------------------------------------------------------------------------------------------------------
need=()
for tool in podman debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" uidmap fuse-overlayfs \
    >/dev/null
fi

# ---- 1. base image -------------------------------------------------------------------------------------------------
if ! podman image exists "$BASE_IMAGE"; then
  rootfs="$WORK/rootfs"
  if [ ! -x "$rootfs/usr/bin/apt-get" ]; then
    log "debootstrap bookworm into $rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log"
  fi
  # This machine reaches PyPI through an egress that re-signs TLS with CAs the host trusts: the local base image
  # trusts the same ones (and pip, which otherwise uses its own bundle, the system's). A base from a registry would
  # not need this.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
  fi
  log "import $BASE_IMAGE"
  tar -C "$rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
fi

# ---- 2. build ------------------------------------------------------------------------------------------------------
torch_args=()
wheel=$(ls /opt/wheels/torch-*+cpu-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ]; then  # the CPU torch on this machine's disk, not gigabytes of CUDA wheels
  version=$(basename "$wheel" | cut -d- -f2)
  torch_args=(--build-arg "TORCH=torch==$version" --build-arg PIP_FIND_LINKS=/host-wheels -v /opt/wheels:/host-wheels:ro)
fi
log "podman build $IMAGE (BASE=$BASE_IMAGE${wheel:+, TORCH from $wheel})"
started=$SECONDS
podman build --format docker --isolation chroot --network host -f docker/Dockerfile \
  --build-arg "BASE=$BASE_IMAGE" "${torch_args[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log"; exit 1; }
log "built in $((SECONDS - started)) s ($(podman image inspect "$IMAGE" --format '{{.Size}}' | numfmt --to=iec) B)"

# ---- 3. run --------------------------------------------------------------------------------------------------------
models="$WORK/models"
rm -rf "$models" "$WORK/store"
mkdir -p "$models" "$WORK/store"
"$PYTHON" -m tensorstream.testing.tiny_checkpoint "$models/tiny" --hidden 64 --layers 4 >/dev/null
chmod -R a+rX "$models"
chown 10001:10001 "$WORK/store"
env_args=(-e TENSORSTREAM_MODEL=/models/tiny -e TENSORSTREAM_VRAM_BUDGET=0.0001)
mode=""
server_pid=""
root=""
cleanup() {
  if [ "$mode" = podman ]; then podman rm -f ts-container-test >/dev/null 2>&1 || true; fi
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ -n "$root" ]; then
    for m in models app/tensorstream_storage tmp dev/shm dev proc; do umount "$root/$m" 2>/dev/null || true; done
    umount "$root" 2>/dev/null || true
    podman image unmount "$IMAGE" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

if podman run -d --name ts-container-test --replace --network host "${env_args[@]}" \
     -v "$models:/models:ro" -v "$WORK/store:/app/tensorstream_storage" "$IMAGE" \
     tensorstream serve --host 127.0.0.1 --port "$PORT" >"$WORK/run.log" 2>&1; then
  mode=podman
  log "started with podman run"
else
  mode=chroot
  log "podman run refused here ($(tail -n 1 "$WORK/run.log")): running the image's filesystem in a chroot"
  podman rm -f ts-container-test >/dev/null 2>&1 || true
  lower=$(podman image mount "$IMAGE")
  root="$WORK/root"
  rm -rf "$WORK/upper" "$WORK/overlay-work"
  mkdir -p "$root" "$WORK/upper" "$WORK/overlay-work"
  mount -t overlay overlay -o "lowerdir=$lower,upperdir=$WORK/upper,workdir=$WORK/overlay-work" "$root"
  mount -t proc proc "$root/proc"
  mount --bind /dev "$root/dev"
  mount -t tmpfs -o size=1g tmpfs "$root/dev/shm"
  mount -t tmpfs tmpfs "$root/tmp"
  mkdir -p "$root/models"
  mount --bind "$models" "$root/models"
  mount -o remount,ro,bind "$root/models"
  mount --bind "$WORK/store" "$root/app/tensorstream_storage"
  # The image's USER, WORKDIR, Env and Cmd, exactly as the runtime would apply them.
  user=$(podman image inspect "$IMAGE" --format '{{.Config.User}}')
  workdir=$(podman image inspect "$IMAGE" --format '{{.Config.WorkingDir}}')
  mapfile -t image_env < <(podman image inspect "$IMAGE" --format '{{range .Config.Env}}{{println .}}{{end}}' | sed '/^$/d')
  mapfile -t cmd < <(podman image inspect "$IMAGE" --format '{{range .Config.Cmd}}{{println .}}{{end}}' | sed '/^$/d')
  chroot --userspec="$user" "$root" /usr/bin/env -i "${image_env[@]}" HOME=/home/tensorstream \
    TENSORSTREAM_MODEL=/models/tiny TENSORSTREAM_VRAM_BUDGET=0.0001 \
    /bin/sh -c 'cd "$0" && exec "$@"' "$workdir" "${cmd[@]}" --host 127.0.0.1 --port "$PORT" >"$WORK/run.log" 2>&1 &
  server_pid=$!
fi

# ---- 4. check ------------------------------------------------------------------------------------------------------
"$PYTHON" - "$PORT" "$models/tiny" <<'EOF'
import json, sys, time, urllib.error, urllib.request

port, checkpoint = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"

def get(path):
    try:
        with urllib.request.urlopen(base + path, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return None, str(error)

deadline = time.monotonic() + 600
while True:
    status, body = get("/health")
    if status == 200:
        break
    if status == 503 and json.loads(body).get("status") == "failed":
        sys.exit(f"container-test: the server failed to load: {body}")
    if time.monotonic() > deadline:
        sys.exit(f"container-test: /health not 200 after 600 s: {status} {body}")
    time.sleep(1)
print(f"container-test: /health 200: {body}")
status, body = get("/ready")
assert status == 200, (status, body)

import torch, transformers
plain = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
prompt = "once upon a time there lived a cat"
ids = tokenizer(prompt)["input_ids"]
with torch.no_grad():
    expected = plain.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
request = urllib.request.Request(base + "/v1/completions", method="POST", headers={"content-type": "application/json"},
                                 data=json.dumps({"model": "/models/tiny", "prompt": prompt, "max_tokens": 8,
                                                  "temperature": 0}).encode())
with urllib.request.urlopen(request, timeout=120) as reply:
    answer = json.loads(reply.read())
got = answer["choices"][0]["token_ids"]
assert got == expected, (got, expected)
print(f"container-test: completion equals the plain model's greedy tokens {got}: {answer['choices'][0]['text']!r}")
status, body = get("/metrics")
assert status == 200 and "tensorstream_generation_tokens_total" in body
EOF

healthcheck=$(podman image inspect "$IMAGE" --format '{{json .Config.Healthcheck}}' 2>/dev/null || echo null)
if [ "$healthcheck" = null ] || [ -z "$healthcheck" ]; then
  healthcheck=$(podman image inspect "$IMAGE" --format '{{json .Healthcheck}}')
fi
mapfile -t probe < <(printf '%s' "$healthcheck" | "$PYTHON" -c 'import json,sys; t=json.load(sys.stdin)["Test"]; print("\n".join(t[1:]))')
probe=("${probe[@]/8000/$PORT}")
if [ "$mode" = podman ]; then
  podman exec ts-container-test "${probe[@]}"
else
  chroot --userspec="$user" "$root" /usr/bin/env -i "${image_env[@]}" "${probe[@]}"
fi
log "the image's HEALTHCHECK (${probe[*]}) passes"
log "PASS ($mode)"
