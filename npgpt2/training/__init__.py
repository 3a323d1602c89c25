"""Training in NumPy with hand-written gradients.

GPT-2 itself: ``AdamW`` (torch.optim.AdamW's semantics), ``clip_grad_norm``, ``accumulate_grad``
(``training.adamw``), learning-rate schedules (``training.schedule``), ``TokenDataset``
(``training.data``), ``new_model`` (GPT-2's initialisation, ``training.init``), ``perplexity`` (``training.evaluate``) and the fine-tuning loop with
checkpoints (``training.loop``). Also sparse autoencoders (``training.sae``), toy models of
superposition (``training.toy_models``) and the plain Adam they share (``training.optim``).

    from npgpt2 import training
    data = training.TokenDataset.from_text_files(["notes.txt"], model.tokenizer)
    opt = training.AdamW(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    for step, batch in zip(range(200), data.batches(batch_size=4, seq_len=256, seed=0)):
        loss, grads = model.value_and_grad(batch)
        training.clip_grad_norm(grads, 1.0)
        opt.step(grads)
    model.save_pretrained("my-gpt2")
"""

from .adamw import AdamW, accumulate_grad, clip_grad_norm, default_decay, named_parameters
from .data import DataError, TokenDataset
from .evaluate import Perplexity, perplexity
from .init import init_state_dict, new_model
from .loop import FinetuneConfig, NonFiniteLossError, RunOptions, finetune
from .schedule import constant, warmup_cosine

__all__ = ["AdamW", "DataError", "FinetuneConfig", "NonFiniteLossError", "Perplexity", "RunOptions", "TokenDataset", "accumulate_grad", "clip_grad_norm",
           "constant", "default_decay", "finetune", "init_state_dict", "named_parameters", "new_model", "perplexity", "warmup_cosine"]
