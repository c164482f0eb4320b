"""The seed's classifier: a frozen CLIP vision tower, its pooled output, dropout and one linear unit.

``score = 2 * sigmoid(linear(dropout(pooler_output))) - 1``, in [-1, 1]. Module names match the
seed's ``modelo_final.pth`` (``clip_encoder.*``, ``linear.*``) so its state dict loads as is.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel


class RealScoreModel(nn.Module):
    """CLIP tower -> pooler_output -> dropout -> Linear(hidden, 1) -> 2*sigmoid - 1."""

    def __init__(self, tower: CLIPVisionModel, *, dropout: float = 0.35, freeze: bool = True):
        super().__init__()
        self.clip_encoder = tower
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(tower.config.hidden_size, 1)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if freeze:
            self.clip_encoder.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return int(self.clip_encoder.config.hidden_size)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's pooled output, shape (batch, hidden)."""
        return self.clip_encoder(pixel_values=pixel_values).pooler_output

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Scores in [-1, 1] from pooled features, shape (batch,). Computed in float32."""
        logits = self.linear(self.dropout(features.to(self.linear.weight.dtype)))
        return 2.0 * torch.sigmoid(logits.float().squeeze(-1)) - 1.0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))
