"""lib: everything a reader of the six chapters can skip (issue 31's support package).

The chapters (bpe.py, model.py, optim.py, accounting.py, train.py, sample.py) are what the CS336 handout asks a
student to build, and that readable code is what runs by default. This package holds the rest, each module named
for what it holds; its header says which chapter it serves. Two floors, with the chapters standing between them:

  below the chapters (import no chapter; take what they need as arguments)
    kernels.py            model.py's fast path (TransformerLM(fast=True)): fused attention, hand-written backward
                          passes for RMSNorm and the SwiGLU gate, RoPE as one complex multiply, index_select lookup
    fused_optim.py        optim.py's fast path: foreach / fused AdamW, the chunked cross-entropy, clip_divisor
    fast_bpe.py           bpe.py's fast path: the array-based trainer, parallel pre-tokenisation, the batch encoder
    batches.py            windows of a token memmap as (x, y) on a device (train.get_batch, evaluation)
    cpu_tuning.py         process-wide CPU switches: subnormals flushed to zero, freed memory kept
    cli.py                the one-line error and its exit codes (2 bad input, 1 environment), atomic writes,
                          optional imports

  above the chapters (operations; import chapters; a chapter's CLI reaches them inside its command function)
    datasets.py           bpe.py encode / prepare: encode_file (parallel .npy), download, prepare
    tokenizer_formats.py  bpe.py export: tokenizer.json (Hugging Face) and .tiktoken
    hf_llama.py           the model as a transformers LlamaForCausalLM: config and state-dict mapping
    hf_export.py          train.py export / import: Hugging Face directories
    checkpoints.py        checkpoint files (atomic, weights_only), their config and tokenizer, device and dtype
    runs.py               train.py's flags, --config, --resume, run directory, log.jsonl / wandb, signals
    distributed.py        torchrun: DDP / FSDP2, sharded state, rank exit
    evaluation.py         the loss over windows, shared by train.py's validation and sample.py --eval
    measure.py            accounting.py --measure: bytes saved for backward, the torch.mm peak, the machine line
    demo.py               the offline demo (`python train.py`) and `train.py plot`

README's "Layout" section draws the whole map.
"""
