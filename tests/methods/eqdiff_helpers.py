"""Toy-world concept data for the EqDiff tests."""
import numpy as np
import torch

from atelier.toyworld import world


def concept_data(name: str = "checker_box", count: int = 3, seed: int = 0):
    """(images (N,3,64,64) in [-1,1], masks (N,1,64,64) bool) of a toy-world concept."""
    scenes = [world.draw_concept(name, seed + i) for i in range(count)]
    images = world.to_tensor_batch(scenes)
    masks = torch.from_numpy(np.stack([scene.masks[0] for scene in scenes]))[:, None]
    return images, masks


def class_images(count: int = 4, seed: int = 100):
    """Ordinary toy scenes standing in for prior-preservation images (saves generating them)."""
    return world.to_tensor_batch(world.batch(seed, count))
