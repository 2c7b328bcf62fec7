"""gradwatch.transformers.GradWatch in a real Hugging Face ``Trainer`` run on CPU: a tiny GPT-2 (tied
``lm_head``), gradient accumulation and ``max_grad_norm=1.0``. The recorded per-layer norms equal a hand
computation of the accumulated gradient before clipping, their total equals the ``grad_norm`` the Trainer
logs, one record per update, and the healthy run gets no finding.
"""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradwatch.transformers import GradWatch  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=12, vocab=48):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % vocab  # counting sequences: learnable

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Reference(transformers.TrainerCallback):
    """Per-layer norms of the accumulated gradient before the Trainer clips it: read at each backward's end."""

    def __init__(self, model):
        self.norms, self.model = [], model
        self.hook = model.lm_head.weight.register_post_accumulate_grad_hook(self.keep)

    def keep(self, _param):  # lm_head.weight is wte.weight, the last parameter to get its gradient
        torch.autograd.Variable._execution_engine.queue_callback(self.read)

    def read(self):
        self.latest = {}
        for name, module in self.model.named_modules():
            grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
            if grads:
                self.latest[name] = torch.cat([g.double().reshape(-1) for g in grads]).norm().item()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.norms.append(self.latest)


def test_recorded_norms_are_the_trainers_grad_norm_before_clipping(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=48, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    gw, ref = GradWatch(every=4), Reference(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=1.0,
        num_train_epochs=3, learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[gw, ref])
    trainer.train()
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(ref.norms) == len(logged) == 24  # 3 epochs x 64 / (4 x 2)
    assert sorted({r[0] for r in gw.records.rows if r[3] == "grad_norm"}) == list(range(24))
    for step, want in enumerate(ref.norms):
        got = gw.records.at("grad_norm", step)
        want = {("lm_head" if k == "transformer.wte" else k): v for k, v in want.items()}  # the tied head
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(v, rel=1e-5) for k, v in want.items()), step
        assert math.sqrt(sum(v**2 for v in got.values())) == pytest.approx(logged[step], rel=1e-5)
    assert gw.records.layers("grad_norm")[-1] == "lm_head"
    clipped = [s for s in range(0, 24, 4) if logged[s] > 1.0]  # max_grad_norm=1.0 clipped these sampled steps
    assert clipped
    for s in clipped:  # clip_grad_norm_'s factor, max_norm / (total + 1e-6), on every layer
        factors = gw.records.at("clip_factor", s)
        assert factors.keys() == gw.records.at("grad_norm", s).keys()
        assert all(f == pytest.approx(1.0 / (logged[s] + 1e-6), rel=1e-4) for f in factors.values())
    assert gw.diagnose() == []
