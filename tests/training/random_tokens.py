"""A dataset of uniformly random tokens: a tiny LM trained on it sits on a noisy plateau at ~log(vocab)."""

import torch

VOCAB, SEQ = 256, 16


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.ids[i]}
