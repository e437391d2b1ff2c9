"""Models and data the tests share: real data that ships in packages, no downloads."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stn_edge.host.demo import DigitsResNet, load_digits  # noqa: F401  (re-exported for tests)


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 192):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)


def quick_train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 4, seed: int = 0) -> nn.Module:
    """A few epochs of Adam: enough for weights with real structure, fast on 2 cores."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            b = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class ONet(nn.Module):
    """MTCNN O-Net (facenet-pytorch's layout, so its state dict loads as is). Input (N, 3, 48, 48)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


class RNet(nn.Module):
    """MTCNN R-Net (facenet-pytorch's layout). Input (N, 3, 24, 24)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.softmax5_1 = nn.Linear(128, 2), nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


def facenet_weights(name: str) -> Path:
    """Path of a state dict shipped in facenet-pytorch (installed --no-deps; never imported: it needs torchvision)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("facenet-pytorch is not installed; run tools/setup-env.sh")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / f"{name}.pt"


def pretrained(cls: type[nn.Module], name: str) -> nn.Module:
    model = cls()
    model.load_state_dict(torch.load(facenet_weights(name), map_location="cpu", weights_only=True))
    return model.eval()


def lfw_faces(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's 100 faces + 100 non-faces, resized to ``size``, MTCNN-normalized, as (N, 3, size, size)."""
    from skimage.data import lfw_subset

    imgs = torch.from_numpy(lfw_subset().astype(np.float32))[:, None]  # (200, 1, 25, 25) in [0, 1]
    imgs = nn.functional.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)
    x = ((imgs.repeat(1, 3, 1, 1) * 255.0 - 127.5) * 0.0078125).numpy()
    y = np.r_[np.ones(100, np.int64), np.zeros(100, np.int64)]
    return np.ascontiguousarray(x), y
