#!/usr/bin/env bash
# Build and test dairllm as aarch64 on an x86_64 Debian/Ubuntu host, without ARM hardware or
# Docker: qemu-user-static + binfmt_misc run an arm64 Debian root filesystem (made once with
# mmdebstrap, then cached), and the project is built and tested inside it with chroot.
#
# What it checks (issue 8):
#   1. the wheel builds as aarch64 (evidence: readelf machine, NEEDED libgomp, NEON/SDOT counts)
#   2. build_info()/--version report the NEON path selected at run time: "neon" on a Cortex-A72
#      (Pi 4, no dot product), "neon-dotprod" on a Cortex-A76 (Pi 5)
#   3. the kernel, model-file, quant, tokenizer, dllama-protocol and golden-logit tests pass there
#      (kernel + platform tests again on the A76 model, so the SDOT path runs too)
#   4. the same logits (within tolerance) and greedy tokens on aarch64 and x86_64 for the golden models
#   5. two-node runs with one x86_64 node (this host) and one aarch64 node (emulated, 127.0.0.1):
#      the native dairllm cluster and the dllama-compatible worker, giving the single-node tokens
#   6. `auditwheel show` of the aarch64 wheel (and, with A64_HOST_WHEEL=1, of an x86_64 one)
#   7. an x86_64 CPU without AVX2 (qemu-x86_64 -cpu Westmere) selects the scalar path and passes
#      the kernel tests: no illegal instruction (A64_X86_FALLBACK=0 skips it)
#
# Needs root, a mountable binfmt_misc and (first run only) apt + the Debian mirror.
# Exit status: 0 all passed, 1 a check failed, 77 skipped (machine does not allow it; the reason
# is printed on a line starting "aarch64: SKIP").
#
# Environment:
#   A64_DIR=/var/tmp/dairllm-a64   cache (root filesystem, golden copy); outside the repo
#   QEMU_CPU=cortex-a72            CPU model for the main run (cortex-a76 = Pi 5, cortex-a53 = Pi 3)
#   A64_SRC=head|worktree          build the committed HEAD (default) or the working tree
#   A64_REBUILD=1                  rebuild the cached root filesystem
#   A64_CACHED_ONLY=1              skip (exit 77) instead of building a missing root filesystem
#   A64_PORT=29431                 first TCP port for the cross-architecture runs
#   PYTHON=/work/venv/bin/python   host Python with dairllm built in place / installed (x86_64 side)
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
A64_DIR=${A64_DIR:-/var/tmp/dairllm-a64}
ROOTFS=$A64_DIR/rootfs
SUITE=${SUITE:-bookworm}              # Raspberry Pi OS 12 base: glibc 2.36, Python 3.11
# The Debian mirror the host's own apt uses (override with MIRROR=...).
host_mirror() {
  awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null \
    || awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null
}
MIRROR=${MIRROR:-$(host_mirror)}
export QEMU_CPU=${QEMU_CPU:-cortex-a72}
A64_SRC=${A64_SRC:-head}
A64_PORT=${A64_PORT:-29431}
PYTHON=$(command -v "${PYTHON:-python3}" || echo "${PYTHON:-python3}")   # a path: qemu-user does not search PATH
GOLDEN=$REPO/tests/golden         # the suite's reference data, inside the repository
ROOT_PKGS="python3 python3-venv python3-dev gcc libc6-dev ca-certificates file binutils ccache"
PIP_PKGS="numpy xxhash cryptography cython pytest hypothesis gguf 'setuptools>=68' wheel auditwheel"
CACHE_KEY="v1 $SUITE | $ROOT_PKGS | $PIP_PKGS"
# The tests that matter on the board: kernels vs float64, formats, tokenizer, dllama protocol,
# golden logits. (The multi-node dllama tests run on x86 already; the cross-arch runs cover them.)
TESTS="tests/test_platform.py tests/test_kernels.py tests/test_quant.py tests/test_modelfile.py
       tests/test_tokenizer.py tests/test_dllama_wire.py tests/test_dllama_hostile.py
       tests/test_golden_logits.py tests/test_repacked.py tests/test_gguf_kernels.py"
TESTS=$(echo $TESTS)                  # one line: it goes into a bash -c string
TESTS_A76="tests/test_platform.py tests/test_kernels.py tests/test_gguf_kernels.py"

T0=$(date +%s); TIMINGS=(); FAILED=()
log() { echo "aarch64: $*"; }
skip() { log "SKIP: $*"; exit 77; }
step() {   # step NAME CMD...: run, time, remember failures, keep going
    local name=$1; shift; local s; s=$(date +%s)
    echo; echo "=== $name"
    if "$@"; then TIMINGS+=("$(printf '%-44s %5d s  ok' "$name" $(( $(date +%s) - s )))")
    else TIMINGS+=("$(printf '%-44s %5d s  FAILED' "$name" $(( $(date +%s) - s )))"); FAILED+=("$name"); fi
}
must() { step "$@"; [ ${#FAILED[@]} -eq 0 ] || finish; }
# run a command in the arm64 chroot with a clean environment (env -i would drop QEMU_CPU: pass it)
inroot() { local cpu=${CPU:-$QEMU_CPU}
    chroot "$ROOTFS" /usr/bin/env -i QEMU_CPU="$cpu" HOME=/root LANG=C.UTF-8 \
        PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 OMP_NUM_THREADS=2 \
        bash -eo pipefail -c "$1"; }

WORKER_PIDS=(); LOCKED=0
cleanup() {   # only a run holding the lock touches the mounts (another run may be using them)
    local pid
    for pid in "${WORKER_PIDS[@]}"; do kill -- -"$pid" 2>/dev/null; done
    [ "$LOCKED" = 1 ] && unmount_all
    return 0
}
take_lock() {   # one run at a time per cache directory
    mkdir -p "$A64_DIR" && exec 9>"$A64_DIR/lock" || skip "cannot write $A64_DIR"
    flock -n 9 || { log "another ci/aarch64.sh holds $A64_DIR/lock; waiting"; flock -w 3600 9; } \
        || skip "$A64_DIR is in use by another run"
    LOCKED=1
}
trap cleanup EXIT
trap 'exit 130' INT TERM

finish() {
    echo; echo "===== aarch64 timings (QEMU_CPU=$QEMU_CPU, source: $A64_SRC)"
    printf '%s\n' "${TIMINGS[@]}"
    log "total $(( $(date +%s) - T0 )) s; cache $(du -shx "$A64_DIR" 2>/dev/null | cut -f1) in $A64_DIR"
    if [ ${#FAILED[@]} -gt 0 ]; then log "FAILED: ${FAILED[*]}"; exit 1; fi
    log "all checks passed"; exit 0
}

# ------------------------------------------------------------------ can this machine do it?
preflight() {
    [ "$(uname -m)" = x86_64 ] || skip "host is $(uname -m), this script emulates aarch64 on x86_64"
    [ "$(id -u)" = 0 ] || skip "needs root (chroot, mount, binfmt_misc)"
    [ -d "$GOLDEN/models" ] || { log "FAILED: golden data not found at $GOLDEN"; exit 1; }
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
            || skip "binfmt_misc is not mounted and cannot be mounted here"
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || ! command -v mmdebstrap >/dev/null \
            || ! command -v arch-test >/dev/null; then
        command -v apt-get >/dev/null || skip "no apt-get to install qemu-user-static/mmdebstrap"
        log "installing qemu-user-static binfmt-support mmdebstrap on the host"
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            qemu-user-static binfmt-support mmdebstrap arch-test >/dev/null; } \
            || skip "apt-get could not install qemu-user-static/mmdebstrap (no mirror?)"
        update-binfmts --enable qemu-aarch64 2>/dev/null || true
    fi
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || skip "qemu-aarch64 binfmt handler not registered"
    grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
        || skip "qemu-aarch64 binfmt handler lacks the F flag (needs qemu-user-static)"
    grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || skip "qemu-aarch64 binfmt handler disabled"
    "$PYTHON" -c 'import dairllm._ops' 2>/dev/null \
        || skip "host python $PYTHON cannot import dairllm._ops (build the x86_64 side first)"
    if [ "${A64_REBUILD:-0}" != 1 ] && [ "$(cat "$ROOTFS/.dairllm-a64-ready" 2>/dev/null)" = "$CACHE_KEY" ]; then
        return 0
    fi
    [ "${A64_CACHED_ONLY:-0}" = 1 ] && skip "no cached root filesystem in $ROOTFS and A64_CACHED_ONLY=1" \
        "(run ci/aarch64.sh once without it to make the cache: about 10-17 min)"
    local host=${MIRROR#*://}; host=${host%%/*}
    timeout 20 bash -c "exec 3<>/dev/tcp/$host/80" 2>/dev/null \
        || skip "no cached root filesystem and the mirror $host is unreachable"
}

# ------------------------------------------------------------------ cached root filesystem
unmount_all() {   # every mount under the root filesystem, deepest first
    local m
    for m in sys dev proc; do mountpoint -q "$ROOTFS/$m" 2>/dev/null && umount -R "$ROOTFS/$m" 2>/dev/null; done
    for m in $(awk -v r="$ROOTFS/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do umount -l "$m"; done
    ! awk -v r="$ROOTFS/" 'index($2, r) == 1 {found=1} END {exit !found}' /proc/mounts
}
make_rootfs() {   # minbase arm64, then compiler + venv with the build/test tools; resumes by stage
    if [ "$(cat "$ROOTFS/.dairllm-a64-ready" 2>/dev/null)" = "$CACHE_KEY" ] && [ "${A64_REBUILD:-0}" != 1 ]; then
        log "cached root filesystem $ROOTFS ($(du -shx "$ROOTFS" | cut -f1))"; return 0
    fi
    unmount_all || { log "cannot unmount everything under $ROOTFS; not deleting it"; return 1; }
    if [ "$(cat "$A64_DIR/.base-$SUITE" 2>/dev/null)" != done ] || [ "${A64_REBUILD:-0}" = 1 ]; then
        rm -rf "$ROOTFS" "$A64_DIR/.base-$SUITE"; mkdir -p "$A64_DIR"
        nice -n 15 mmdebstrap --arch=arm64 --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" || return 1
        echo done > "$A64_DIR/.base-$SUITE"
    else
        log "resuming from the cached $SUITE base in $ROOTFS"
    fi
    mount_rootfs || return 1
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then  # HTTPS proxies with own CA
        mkdir -p "$ROOTFS/usr/local/share/ca-certificates"
        cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
    fi
    inroot "apt-get update -qq && nice -n 15 apt-get install -y -qq --no-install-recommends $ROOT_PKGS >/dev/null
            update-ca-certificates >/dev/null 2>&1 || true
            rm -rf /opt/venv && python3 -m venv /opt/venv && pip install -q -U pip && nice -n 15 pip install -q -U $PIP_PKGS
            apt-get clean && rm -rf /var/lib/apt/lists/* /root/.cache/pip
            pip list 2>/dev/null | grep -iE '^(numpy|xxhash|cryptography|cython|pytest|hypothesis|gguf|setuptools|auditwheel) '" || return 1
    echo "$CACHE_KEY" > "$ROOTFS/.dairllm-a64-ready"
}
mount_rootfs() {
    mountpoint -q "$ROOTFS/proc" || mount -t proc proc "$ROOTFS/proc" || return 1
    mountpoint -q "$ROOTFS/dev" || { mount --rbind /dev "$ROOTFS/dev" && mount --make-rslave "$ROOTFS/dev"; } || return 1
    mountpoint -q "$ROOTFS/sys" || mount -t sysfs sysfs "$ROOTFS/sys" || return 1
    cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
}

# ------------------------------------------------------------------ source, build, evidence
copy_source() {   # the project (golden data in tests/golden) at /work/main, as on the host
    rm -rf "$ROOTFS/work/main"; mkdir -p "$ROOTFS/work/main"
    if [ "$A64_SRC" = worktree ]; then
        tar -C "$REPO" --exclude=.git --exclude=build --exclude=dist --exclude='*.so' \
            --exclude='*.egg-info' --exclude=__pycache__ --exclude='src/dairllm/_*.c' -cf - . \
            | tar -C "$ROOTFS/work/main" -xf - || return 1
    else
        git -C "$REPO" archive HEAD | tar -C "$ROOTFS/work/main" -xf - || return 1
        log "source: $(git -C "$REPO" log -1 --format='%h %s' | cut -c1-100)"
    fi
}
build() {   # a wheel, as pip would build it on a Pi; installed into the chroot's venv
    # gcc under emulation is the slow part (~6 min for the two Cython modules): ccache in the
    # cached root filesystem makes an unchanged module a cache hit. Cython itself runs on the
    # host when it can (same portable C, native speed); otherwise in the chroot.
    if (cd "$ROOTFS/work/main" && "$PYTHON" -c "import Cython, numpy" 2>/dev/null \
            && "$PYTHON" setup.py --name >/dev/null 2>&1); then
        log "Cython ran on the host: $(cd "$ROOTFS/work/main" && ls src/dairllm/_*.c | tr '\n' ' ')"
    fi
    # (ccache through its masquerade directory: CC='ccache gcc' would make setup.py probe OpenMP
    # with 'ccache -fopenmp' and silently build without it)
    inroot "cd /work/main && rm -rf /work/dist build && export PATH=/usr/lib/ccache:\$PATH CCACHE_DIR=/var/cache/dairllm-ccache \
            && ccache -z >/dev/null && nice -n 15 pip wheel -q --no-build-isolation --no-deps -w /work/dist . \
            && pip install -q --no-deps --force-reinstall /work/dist/*.whl && ls -l /work/dist \
            && ccache -s | grep -iE 'hits|misses|cache size' | tr -s ' ' | paste -sd ';'"
}
evidence() {
    inroot 'cd / && so=$(python -c "import dairllm._ops as m; print(m.__file__)")
        echo "extension: $so"
        file -L "$so"
        readelf -h "$so" | grep -E "Class|Machine"
        readelf -d "$so" | grep NEEDED
        readelf -d "$so" | grep -q "NEEDED.*libgomp" || { echo "MISSING libgomp in NEEDED"; exit 1; }
        ldd "$so" | grep -E "gomp|libc\.so"
        objdump -d "$so" > /tmp/ops.asm
        echo "NEON instructions in the extension: sdot $(grep -cE "\ssdot\s" /tmp/ops.asm)," \
             "fmla .4s $(grep -cE "\sfmla\s+v[0-9]+\.4s" /tmp/ops.asm)," \
             "smull/smlal $(grep -cE "\s(smull|smlal)2?\s" /tmp/ops.asm)"
        python -c "import platform; print(\"platform.machine():\", platform.machine())"
        python -m dairllm --version'
    local cpu want
    for cpu in cortex-a72:neon cortex-a76:neon-dotprod cortex-a53:neon; do
        want=${cpu#*:}; cpu=${cpu%%:*}
        CPU=$cpu inroot "cd / && python -c 'import dairllm, json; i = dairllm.build_info(); \
            print(\"QEMU_CPU=$cpu build_info:\", json.dumps(i)); \
            assert i[\"arch\"] == \"aarch64\" and i[\"openmp\"], i; \
            assert i[\"simd_selected\"] == \"$want\", (\"expected $want\", i[\"simd_selected\"])'" || return 1
    done
}
pytest_a72() { inroot "cd /work/main && python -m pytest -q -p no:cacheprovider $TESTS"; }
pytest_a76() { CPU=cortex-a76 inroot "cd /work/main && python -m pytest -q -p no:cacheprovider $TESTS_A76"; }

# ------------------------------------------------------------------ aarch64 vs x86_64
logits_compare() {   # same recorded tokens through the engine on both architectures
    inroot "cd /work/main && python ci/a64_check.py dump /work/logits-aarch64.npz" || return 1
    "$PYTHON" "$REPO/ci/a64_check.py" dump /tmp/dairllm-logits-x86_64.npz || return 1
    "$PYTHON" "$REPO/ci/a64_check.py" compare /tmp/dairllm-logits-x86_64.npz "$ROOTFS/work/logits-aarch64.npz"
}
CLUSTER_MODELS="tiny_f32 tiny_q40 moetiny_q40"
start_worker() {   # start_worker PORT MODEL: `dairllm worker` as aarch64 in the chroot on 127.0.0.1
    local port=$1 model=$2 logf=$A64_DIR/worker-$1.log
    setsid chroot "$ROOTFS" /usr/bin/env -i QEMU_CPU="$QEMU_CPU" HOME=/root LANG=C.UTF-8 \
        PATH=/opt/venv/bin:/usr/bin:/bin OMP_NUM_THREADS=2 \
        python -m dairllm -v worker --host 127.0.0.1 --port "$port" --nthreads 2 \
        --model "/work/main/tests/golden/models/$model.m" >"$logf" 2>&1 &
    WORKER_PIDS+=($!)
}
wait_worker() {   # wait_worker PORT: python + numpy start slowly under emulation
    local logf=$A64_DIR/worker-$1.log i
    for i in $(seq 1 360); do
        grep -q "listening" "$logf" 2>/dev/null && { log "aarch64 worker: $(head -n1 "$logf")"; return 0; }
        sleep 0.5
    done
    log "aarch64 worker on port $1 did not start:"; cat "$logf"; return 1
}
stop_workers() {
    local pid; for pid in "${WORKER_PIDS[@]}"; do kill -- -"$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    WORKER_PIDS=()
}
cross_cluster() {   # one aarch64 worker per model (a native worker serves the model it was given)
    local port=$A64_PORT model args=() rc=0
    for model in $CLUSTER_MODELS; do
        start_worker "$port" "$model"; args+=("$model=127.0.0.1:$port"); port=$((port + 1))
    done
    for ((port = A64_PORT; port < A64_PORT + ${#args[@]}; port++)); do wait_worker "$port" || rc=1; done
    [ $rc = 0 ] && { timeout 1200 "$PYTHON" "$REPO/ci/a64_check.py" cluster "${args[@]}" || rc=1; }
    stop_workers
    for ((port = A64_PORT; port < A64_PORT + ${#args[@]}; port++)); do
        echo "--- aarch64 worker log, port $port (tail)"; tail -n 6 "$A64_DIR/worker-$port.log"
    done
    return $rc
}
x86_fallback() {   # an x86_64 CPU without AVX2 (qemu-x86_64 -cpu Westmere): scalar path, no SIGILL
    local q="env -u QEMU_CPU qemu-x86_64-static -cpu Westmere"
    (cd "$REPO" && $q "$PYTHON" -c 'import dairllm, json; i = dairllm.build_info()
print("x86_64 without AVX2 build_info:", json.dumps(i))
assert i["simd_selected"] == "scalar" and "avx2" not in i["simd_supported"], i' \
        && nice -n 15 $q "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels.py)
}
auditwheel_a64() { inroot 'cd /work/dist && auditwheel show *.whl'; }
auditwheel_host() {   # optional (A64_HOST_WHEEL=1): the x86_64 wheel built on this host
    local out=/tmp/dairllm-wheel-x86_64; rm -rf "$out"
    nice -n 15 "$PYTHON" -m pip wheel -q --no-deps -w "$out" "$REPO" || return 1
    "$PYTHON" -m auditwheel show "$out"/*.whl
}

main() {
    preflight
    take_lock
    must "root filesystem (cached after first run)" make_rootfs
    must "mount proc/dev/sys" mount_rootfs
    must "copy source + golden data" copy_source
    must "build wheel (aarch64, gcc -fopenmp)" build
    step "evidence: ELF, libgomp, NEON path selected" evidence
    step "pytest (QEMU_CPU=$QEMU_CPU)" pytest_a72
    step "pytest kernels (QEMU_CPU=cortex-a76, dotprod)" pytest_a76
    step "logits+greedy: aarch64 vs x86_64" logits_compare
    step "two nodes: x86_64 root + aarch64 worker" cross_cluster
    step "auditwheel show (aarch64 wheel)" auditwheel_a64
    [ "${A64_X86_FALLBACK:-1}" = 1 ] && step "x86_64 without AVX2: scalar fallback" x86_fallback
    [ "${A64_HOST_WHEEL:-0}" = 1 ] && step "auditwheel show (x86_64 wheel)" auditwheel_host
    finish
}

main "$@"
