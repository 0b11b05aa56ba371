"""Character-level LSTM: embedding -> one LSTM layer -> linear over the vocabulary.

Input: int64 character ids ``(n, T)``; output: logits ``(n, vocab_size)`` for the character that
follows the sequence (the LEAF/FedMA Shakespeare task).
"""

from __future__ import annotations

import torch
from torch import nn


class CharLSTM(nn.Module):
    def __init__(self, vocab_size: int = 98, embed_dim: int = 8, hidden: int = 256) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=1, batch_first=True)
        self.fc = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(x))
        return self.fc(out[:, -1])
