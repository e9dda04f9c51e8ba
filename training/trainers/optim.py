"""`optim: muon`: torch.optim.Muon on the 2-D hidden matrices, AdamW on everything Muon should not touch.

Muon orthogonalises the update of a weight matrix, which suits the hidden projections but not embeddings, the LM
head (rows are per-token vectors) or 1-D gains and decays. `MuonWithAdamW` steps both optimizers as one
`torch.optim.Optimizer`, so the Trainer's LR schedulers (they scale each group's `lr` from its `initial_lr`),
gradient clipping (on the model's parameters) and checkpoint save/resume (`state_dict`) work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn


class _MergedState(Mapping):
    """Read-only view of both optimizers' per-parameter state (their parameters are disjoint)."""

    def __init__(self, *states):
        self.states = states

    def __getitem__(self, param):
        for state in self.states:
            if param in state:
                return state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator:
        for state in self.states:
            yield from state

    def __len__(self) -> int:
        return sum(len(state) for state in self.states)


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer over a `torch.optim.Muon` and a `torch.optim.AdamW`.

    `param_groups` is the Muon groups followed by the AdamW groups (the same dicts, so a scheduler that edits
    `group["lr"]` steers both); `state_dict()` is `{"muon": ..., "adamw": ...}`.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], defaults={})
        self._relink()

    def _relink(self) -> None:
        # The children own the group dicts and the state; this object only points at them.
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]
        self.state = _MergedState(self.muon.state, self.adamw.state)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError(
                f"optimizer state has keys {sorted(state_dict)}; expected ['adamw', 'muon'] (a checkpoint written with "
                "optim=muon). Resume with the optimizer the checkpoint was trained with."
            )
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._relink()  # load_state_dict replaces the children's group dicts

    def __repr__(self) -> str:
        return f"MuonWithAdamW(\n{self.muon!r},\n{self.adamw!r})"


def split_muon_params(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(muon, adamw) named trainable parameters: Muon gets 2-D matrices that are not embeddings or the LM head."""
    excluded: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            excluded.add(id(module.weight))
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            excluded.add(id(module.weight))
    muon, adamw = [], []
    for name, param in model.named_parameters():  # tied weights appear once
        if not param.requires_grad:
            continue
        (muon if param.ndim == 2 and id(param) not in excluded else adamw).append((name, param))
    return muon, adamw


def build_muon_optimizer(
    model: nn.Module,
    *,
    muon_lr: float,
    adamw_lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.95,
    adjust_lr_fn: str = "original",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    decay_parameter_names: set[str] | None = None,
) -> MuonWithAdamW:
    """Muon (lr `muon_lr`) on hidden matrices + AdamW (lr `adamw_lr`) on the rest.

    AdamW applies `weight_decay` to the names in `decay_parameter_names` (the Trainer's choice: not biases or norms;
    all of them when None) and 0 to the others.
    """
    muon_named, adamw_named = split_muon_params(model)
    if not muon_named:
        raise ValueError("optim=muon found no 2-D hidden matrices to optimise; use an AdamW optimizer for this model")
    muon = torch.optim.Muon(
        [p for _, p in muon_named], lr=muon_lr, weight_decay=weight_decay, momentum=momentum,
        adjust_lr_fn=adjust_lr_fn,
    )
    decay = [p for n, p in adamw_named if decay_parameter_names is None or n in decay_parameter_names]
    no_decay = [p for n, p in adamw_named if not (decay_parameter_names is None or n in decay_parameter_names)]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    adamw = torch.optim.AdamW(groups, lr=adamw_lr, betas=betas, eps=eps)
    return MuonWithAdamW(muon, adamw)
