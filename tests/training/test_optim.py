"""optim=muon: which parameters Muon gets, equivalence with the two torch optimizers, schedulers, save/resume."""

import copy
import io

import pytest
import torch

from hf_retnet import RetNetConfig, RetNetForCausalLM
from training.trainers.optim import MuonWithAdamW, build_muon_optimizer, split_muon_params
from tests.tiny_models import build_tiny_llama


def tiny_retnet(tie=True, seed=0):
    torch.manual_seed(seed)
    return RetNetForCausalLM(RetNetConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4,
                                          intermediate_size=64, chunk_size=8, tie_word_embeddings=tie))


def loss_of(model, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("make", [lambda: tiny_retnet(tie=True), lambda: tiny_retnet(tie=False),
                                  lambda: build_tiny_llama(97, hidden_size=32)])
def test_muon_gets_only_hidden_matrices(make):
    model = make()
    muon, adamw = split_muon_params(model)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert muon and all(p.ndim == 2 for _, p in muon)
    assert all(p is not embed and p is not head for _, p in muon)
    names = {n for n, _ in adamw}
    assert any("embed" in n for n in names) and all(p.ndim == 1 or p is embed or p is head for _, p in adamw)
    assert len(muon) + len(adamw) == len(list(model.parameters()))  # every trainable parameter exactly once


def test_matches_the_two_torch_optimizers():
    model = tiny_retnet()
    reference = copy.deepcopy(model)
    opt = build_muon_optimizer(model, muon_lr=0.02, adamw_lr=1e-3, weight_decay=0.1, momentum=0.9)
    muon_ref, adamw_ref = split_muon_params(reference)
    ref_opts = [torch.optim.Muon([p for _, p in muon_ref], lr=0.02, weight_decay=0.1, momentum=0.9),
                torch.optim.AdamW([p for _, p in adamw_ref], lr=1e-3, weight_decay=0.1)]
    for step in range(3):
        loss_of(model, step).backward()
        loss_of(reference, step).backward()
        opt.step()
        opt.zero_grad()
        for o in ref_opts:
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_scheduler_drives_both_learning_rates():
    opt = build_muon_optimizer(tiny_retnet(), muon_lr=0.02, adamw_lr=1e-3)
    assert isinstance(opt, torch.optim.Optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for _ in range(2):
        opt.step()
        scheduler.step()
    assert [g["lr"] for g in opt.muon.param_groups] == pytest.approx([0.005])
    assert [g["lr"] for g in opt.adamw.param_groups] == pytest.approx([0.00025] * len(opt.adamw.param_groups))


def test_state_dict_round_trip_continues_identically():
    """Save after 2 steps (through torch.save / weights_only load, as the Trainer does), resume, compare."""
    model = tiny_retnet()
    opt = build_muon_optimizer(model, muon_lr=0.02, adamw_lr=1e-3)
    for step in range(2):
        loss_of(model, step).backward()
        opt.step()
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed_model = copy.deepcopy(model)
    resumed = build_muon_optimizer(resumed_model, muon_lr=0.02, adamw_lr=1e-3)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert len(resumed.state) == len(opt.state) > 0
    for m, o in ((model, opt), (resumed_model, resumed)):
        for step in range(2, 4):
            loss_of(m, step).backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loading_an_adamw_checkpoint_is_a_clear_error():
    model = tiny_retnet()
    adamw_state = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="optim=muon"):
        build_muon_optimizer(model, muon_lr=0.02, adamw_lr=1e-3).load_state_dict(adamw_state)


def test_trainer_builds_muon_and_clips(tmp_path, tiny_teacher_dir, tiny_tokenizer):
    from training.trainers.distillation_config import DistillationConfig
    from training.trainers.distillation_trainer import DistillationTrainer

    model = RetNetForCausalLM(RetNetConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1,
                                           num_heads=4, intermediate_size=64))
    config = DistillationConfig(output_dir=str(tmp_path / "o"), teacher_model=tiny_teacher_dir, optim="muon",
                                muon_learning_rate=0.05, learning_rate=2e-3, weight_decay=0.01, teacher_topk=8,
                                report_to="none", use_cpu=True)
    trainer = DistillationTrainer(model=model, args=config)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    opt = trainer.optimizer
    assert isinstance(opt, MuonWithAdamW)
    assert opt.muon.param_groups[0]["lr"] == 0.05 and opt.adamw.param_groups[0]["lr"] == 2e-3
    # AdamW: decay on the embedding, none on norms (the Trainer's own choice of decayed parameters)
    decays = {g["weight_decay"]: len(g["params"]) for g in opt.adamw.param_groups}
    assert decays.get(0.01) == 1 and decays.get(0.0, 0) >= 1
