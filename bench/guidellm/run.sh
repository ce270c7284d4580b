#!/usr/bin/env bash
# guidellm against a running Tether, offline: installs guidellm (pinned, with everything it
# needs, from bench/guidellm/requirements.txt) into its own virtual environment in
# .tools/guidellm/, apart from the project's uv.lock, then runs `guidellm run` with the
# backend, model and tokenizer set, and HF_HUB_OFFLINE=1 so that nothing is fetched from a hub.
#
#   bench/guidellm/run.sh                    # the default load (below) against `make run`
#   bench/guidellm/run.sh --profile kind=constant,rate=5 --constraint kind=max_duration,seconds=10 \
#     --data kind=synthetic_text,prompt_tokens=256,output_tokens=32    # your own options
#
# Arguments, when given, replace the default load and outputs; --backend and --tokenizer are
# always set from:
#   LOADTEST_TARGET     Tether's base URL (default http://127.0.0.1:8080, where `make run` serves)
#   LOADTEST_MODEL      the model to ask for (default local)
#   LOADTEST_TOKENIZER  a tokenizer folder or Hugging Face name (default: the byte-level one in
#                       bench/guidellm/tokenizer/; for a real model, its own tokenizer)
#   UV                  the uv command (the Makefile passes its own; else uv on PATH, else
#                       .tools/bin/uv, which `make run` or `make test` bootstrap)
#
# guidellm 0.8 needs torch. PyPI's torch for Linux x86_64 is the CUDA build (about 5 GB with its
# CUDA libraries); where pip's find-links (PIP_FIND_LINKS) hold a CPU build of the pinned
# torch, as on this project's machines, it is taken from there and the environment is about
# 1.2 GB. Its Python must be 3.11 (the pins were resolved for it).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/bench/guidellm"
venv="$root/.tools/guidellm"
uv="${UV:-$(command -v uv || echo "$root/.tools/bin/uv")}"

find_links=()
for dir in ${PIP_FIND_LINKS:-}; do find_links+=(--find-links "$dir"); done
if [ ! -x "$venv/bin/python" ]; then $uv venv -q --python python3 "$venv"; fi
if [ ! -x "$venv/bin/guidellm" ]; then
  echo "guidellm: installing into $venv (pinned in bench/guidellm/requirements.txt)" >&2
fi
# Quick when the environment already matches the pins: nothing is downloaded then.
$uv pip install -q --python "$venv/bin/python" "${find_links[@]}" -r "$here/requirements.txt"

if [ "$#" -eq 0 ]; then
  # Three fixed rates, 15 s each; each request asks for 32 tokens, which `local` (40 tokens/s
  # by default) streams in about 0.8 s. Prompts of 256 bytes are about 41 words.
  set -- --profile kind=constant --override profile.rate 1,10,20 \
    --constraint kind=max_duration,seconds=15 \
    --data kind=synthetic_text,prompt_tokens=256,output_tokens=32 \
    --output kind=console --output kind=json,path="$root/.tools/guidellm-benchmarks.json"
fi

# guidellm starts up to 10 worker processes per benchmark (spawned, each importing torch and
# transformers): on 2 cores that alone takes about a minute. One async worker process keeps
# up with these loads.
export GUIDELLM__MAX_WORKER_PROCESSES="${GUIDELLM__MAX_WORKER_PROCESSES:-1}"
export HF_HUB_OFFLINE=1
exec "$venv/bin/guidellm" run \
  --backend "kind=openai_http,target=${LOADTEST_TARGET:-http://127.0.0.1:8080},model=${LOADTEST_MODEL:-local}" \
  --tokenizer "kind=huggingface_auto,model=${LOADTEST_TOKENIZER:-$here/tokenizer}" \
  "$@"
