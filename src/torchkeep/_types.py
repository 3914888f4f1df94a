"""Type aliases shared by the layers."""

from __future__ import annotations

import torch

Device = str | torch.device
