"""The modelling core: the one place that turns records into tokens and tokens into answers.

Training validation, classification (score and generate), dialogue answers, the local judge and the
torchtune backend's validation all go through these modules, so a prompt is encoded, a label tokenized,
a shared prefix run and a response cut the same way everywhere:

- `prompts`: the prompt templates (render, split into shared prefix + per-item suffix).
- `codec`: `PromptCodec`, a tokenizer bound to one template/instruction/label set: prefix ids, the
  template tail, each label's tokens as they follow the prompt, per-item bodies cut to fit, and
  training examples (prompt + label + EOS, loss on the response only).
- `forward`: the decoder and LM head of a (PEFT-wrapped) causal LM, the shared prefix's key/value cache
  and the shared-prefix forward used for the training loss.
- `scoring`: label log-likelihoods after each prompt in one forward pass over the shared prefix's cache.
- `generation`: free generation with one set of stop rules, and the exact-one-label parser.
- `next_token`: the next-token distribution over given candidate tokens after prompts (the local
  judge's probability-weighted scores).
"""
