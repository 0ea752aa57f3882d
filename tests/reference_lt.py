"""The published long-tailed CIFAR construction, re-implemented independently of longtail's code
(kaidic/LDAM-DRW imbalance_cifar.py), for the tests that compare our subsets against it."""

import numpy as np


def reference_subset(
    labels: np.ndarray, img_max: int, cls_num: int, imb_factor: float, rand_number: int = 0
) -> np.ndarray:
    """Independent re-implementation of kaidic/LDAM-DRW imbalance_cifar.py (exp profile), returning the
    selected positions: global np.random.seed + np.random.shuffle over np.unique(targets)."""
    state = np.random.get_state()
    try:
        np.random.seed(rand_number)
        img_num_per_cls = [
            int(img_max * (imb_factor ** (i / (cls_num - 1.0)))) for i in range(cls_num)
        ]
        targets_np = np.array(labels, dtype=np.int64)
        selected = []
        for the_class, the_img_num in zip(np.unique(targets_np), img_num_per_cls):
            idx = np.where(targets_np == the_class)[0]
            np.random.shuffle(idx)
            selected.append(idx[:the_img_num])
        return np.concatenate(selected)
    finally:
        np.random.set_state(state)
