#!/usr/bin/env bash
# Start one LightX2V API server on port 8000, configured from the environment.
#
#   LIGHTX2V_MODEL_CLS    model class, e.g. wan2.1                     (required)
#   LIGHTX2V_TASK         task, e.g. t2v or i2v                        (required)
#   LIGHTX2V_MODEL_PATH   model directory inside the container, under the read-only /models mount (required)
#   LIGHTX2V_CONFIG_JSON  model config file, e.g. /workspace/LightX2V/configs/wan/wan_t2v.json (required)
#   LIGHTX2V_MAX_QUEUE_SIZE  optional: tasks the node accepts (pending + running); upstream default 10
#   LIGHTX2V_LORA_DIR        optional: directory of LoRA .safetensors files
#
# The flags come from ModelTC/LightX2V@f8aee98b:
#   lightx2v/server/__main__.py   --model_path, --model_cls, --host, --port, --max_queue_size and
#                                 --lora_dir are its argparse options; any other `--key value`
#                                 pair is copied onto args unparsed.
#   scripts/server/start_server.sh  passes --task and --config_json that way (--model_cls wan2.1
#                                 --task t2v --config_json .../configs/wan/wan_t2v.json), and
#                                 lightx2v/server/services/inference/worker.py reads args.task, so
#                                 --task is required in practice even though argparse does not say so.
#
# Everything is checked before Python starts: a node that dies after minutes of loading a model
# because a path was mistyped is a slow way to learn about it.
set -euo pipefail

fail() {
    printf 'x2v-node: %s\n' "$1" >&2
    exit 2
}

for name in LIGHTX2V_MODEL_CLS LIGHTX2V_TASK LIGHTX2V_MODEL_PATH LIGHTX2V_CONFIG_JSON; do
    if [[ -z "${!name:-}" ]]; then
        fail "${name} is not set. Set it in .env (see deploy/compose.env.example)."
    fi
done

model_path=${LIGHTX2V_MODEL_PATH}
config_json=${LIGHTX2V_CONFIG_JSON}

if [[ ! -e "${model_path}" ]]; then
    fail "model path ${model_path} does not exist in the container (LIGHTX2V_MODEL_PATH).
Download the model into the host's models directory (X2V_MODELS_DIR), which is mounted read-only
at /models, for example:
    huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B --local-dir \"\$X2V_MODELS_DIR/Wan2.1-T2V-1.3B\""
fi
if [[ ! -d "${model_path}" ]]; then
    fail "model path ${model_path} is not a directory (LIGHTX2V_MODEL_PATH)."
fi
if [[ ! -r "${model_path}" || ! -x "${model_path}" ]]; then
    fail "model path ${model_path} is not readable by uid $(id -u) (LIGHTX2V_MODEL_PATH)."
fi
if [[ -z "$(ls -A "${model_path}")" ]]; then
    fail "model path ${model_path} is empty: the download did not finish or the wrong directory is mounted (LIGHTX2V_MODEL_PATH)."
fi
if [[ ! -f "${config_json}" ]]; then
    fail "config file ${config_json} does not exist in the container (LIGHTX2V_CONFIG_JSON).
Use one shipped in the image under /workspace/LightX2V/configs/, or put your own next to the
models and point LIGHTX2V_CONFIG_JSON at /models/<file>.json."
fi
if [[ ! -r "${config_json}" ]]; then
    fail "config file ${config_json} is not readable by uid $(id -u) (LIGHTX2V_CONFIG_JSON)."
fi

args=(
    --model_cls "${LIGHTX2V_MODEL_CLS}"
    --task "${LIGHTX2V_TASK}"
    --model_path "${model_path}"
    --config_json "${config_json}"
    # 0.0.0.0 inside the container only; compose never publishes this port.
    --host 0.0.0.0
    --port 8000
)
# __main__.py's own --max_queue_size default (10) overrides upstream's LIGHTX2V_MAX_QUEUE_SIZE
# variable (lightx2v/server/main.py), so the value has to travel as the flag.
if [[ -n "${LIGHTX2V_MAX_QUEUE_SIZE:-}" ]]; then
    args+=(--max_queue_size "${LIGHTX2V_MAX_QUEUE_SIZE}")
fi
if [[ -n "${LIGHTX2V_LORA_DIR:-}" ]]; then
    args+=(--lora_dir "${LIGHTX2V_LORA_DIR}")
fi

printf 'x2v-node: python -m lightx2v.server %s\n' "${args[*]}" >&2
# exec: the server becomes the container's main process and gets SIGTERM itself
# (lightx2v/server/main.py installs its own SIGTERM handler).
exec python -m lightx2v.server "${args[@]}"
