"""The shapes-world generator: determinism, masks, captions, concepts, tokenizer."""
import numpy as np
import pytest

from atelier.toyworld import world


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b = world.scene_from_seed(7), world.scene_from_seed(7)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert all(np.array_equal(m, n) for m, n in zip(a.masks, b.masks))
    c = world.scene_from_seed(8)
    assert not np.array_equal(a.image, c.image)
    first, again = world.batch(3, 5), world.batch(3, 5)
    assert [s.caption for s in first] == [s.caption for s in again]


def test_image_format():
    s = world.scene_from_seed(0)
    assert s.image.shape == (world.SIZE, world.SIZE, 3) and s.image.dtype == np.uint8


@pytest.mark.parametrize("seed", range(20))
def test_masks_cover_their_objects(seed):
    scene = world.scene_from_seed(seed)
    assert len(scene.masks) == len(scene.spec.objects)
    for obj, mask in zip(scene.spec.objects, scene.masks):
        assert mask.shape == (world.SIZE, world.SIZE) and mask.dtype == bool
        assert mask.sum() > 50
        ys, xs = np.nonzero(mask)
        # The mask sits around the object's centre and within its radius (plus the AA pixel).
        assert abs(xs.mean() + 0.5 - obj.cx) < obj.radius / 2
        assert np.hypot(xs + 0.5 - obj.cx, ys + 0.5 - obj.cy).max() <= obj.radius * 1.25 + 1
    if len(scene.masks) == 2:
        assert not (scene.masks[0] & scene.masks[1]).any()


def test_masked_pixels_carry_the_object_colour():
    scene = world.scene_from_seed(5, num_objects=1, colours=["red"], background_kind="solid",
                                  background_colour="white")
    pix = scene.image[scene.masks[0]].astype(float)
    assert (pix[:, 0] > pix[:, 1] + 60).mean() > 0.95
    away = world.signed_distance(scene.spec.objects[0]) > 1.0  # beyond the anti-aliased rim
    bg = scene.image[away].astype(float)
    assert np.abs(bg - np.array(world.BACKGROUND_COLOURS["white"]) * 255).max() < 2


def test_shading_differs_from_the_flat_scribble():
    scene = world.scene_from_seed(11, num_objects=1, background_kind="solid")
    flat = world.scribble_of(scene)
    inside = world.signed_distance(scene.spec.objects[0]) < -1.0  # inside the anti-aliased rim
    assert np.unique(flat[inside], axis=0).shape[0] == 1  # one flat colour
    assert scene.image[inside].astype(float).std(0).mean() > 8  # shaded
    assert np.abs(flat[inside].astype(int) - scene.image[inside]).mean() > 5


def test_textured_backgrounds_are_high_frequency():
    for kind, minimum in (("striped", 10), ("dotted", 5)):
        s = world.scene_from_seed(2, background_kind=kind, num_objects=1)
        bg = s.image[~s.masks[0]].astype(float)
        assert bg.std(0).mean() > minimum
    grad = world.scene_from_seed(2, background_kind="gradient", num_objects=1).image.astype(float)
    assert grad[:4].mean() > grad[-4:].mean() + 20  # light at the top, darker below


@pytest.mark.parametrize("seed", range(30))
def test_captions_round_trip(seed):
    scene = world.scene_from_seed(seed)
    parsed = world.parse_caption(scene.caption)
    assert parsed["objects"] == [(o.colour, o.shape) for o in scene.spec.objects]
    assert parsed["background_kind"] == scene.spec.background_kind
    assert parsed["background_colour"] == scene.spec.background_colour


def test_caption_example_and_rejects():
    p = world.parse_caption("a red circle and a blue square on a striped yellow background")
    assert p == {"objects": [("red", "circle"), ("blue", "square")], "background_kind": "striped",
                 "background_colour": "yellow"}
    for bad in ("a red dog on a white background", "a red circle", "a red circle on a teal background"):
        with pytest.raises(ValueError):
            world.parse_caption(bad)


def test_requested_attributes_are_respected():
    s = world.scene_from_seed(4, num_objects=2, shapes=["triangle", "circle"], colours=["purple", "orange"],
                              background_kind="dotted", background_colour="pink")
    assert s.caption == "a purple triangle and a orange circle on a dotted pink background"


@pytest.mark.parametrize("name", world.CONCEPT_NAMES)
def test_concepts_render_in_varied_poses_with_masks(name):
    a, b = world.draw_concept(name, seed=1), world.draw_concept(name, seed=2)
    assert a.spec.objects[0].concept == name and a.masks[0].sum() > 50
    assert (a.spec.objects[0].cx, a.spec.objects[0].angle) != (b.spec.objects[0].cx, b.spec.objects[0].angle)
    # Two-tone: the concept's pixels hold two distinct colour clusters.
    pix = a.image[a.masks[0]].astype(float)
    c0, c1 = (np.array(c) * 255 for c in world.CONCEPTS[name].colours)
    near0 = np.linalg.norm(pix - c0, axis=1) < np.linalg.norm(pix - c1, axis=1)
    assert 0.1 < near0.mean() < 0.9
    assert world.CONCEPTS[name].noun in a.caption
    d = world.draw_concept(name, seed=3, with_distractor=True)
    assert len(d.masks) == 2 and d.spec.objects[1].concept is None


def test_ordinary_batches_never_contain_concepts():
    assert all(o.concept is None for s in world.batch(0, 200) for o in s.spec.objects)
    with pytest.raises(KeyError):
        world.draw_concept("unicorn", 0)


def test_tokenizer_survives_save_and_stock_load(tmp_path):
    from transformers import CLIPTokenizer

    from atelier.toyworld.vocab import build_tokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    caption = world.scene_from_seed(3).caption
    assert loaded(caption).input_ids == tok(caption).input_ids
    words = loaded.convert_ids_to_tokens(loaded(caption).input_ids)[1:-1]
    assert [w.removesuffix("</w>") for w in words] == caption.split()  # one token per word


@pytest.mark.parametrize("kind", ["striped", "dotted"])
def test_textures_vary_across_f8_latent_cells(kind):
    """An f8 VAE's decoder (convolutions, nearest upsampling) is translation-equivariant: a
    texture whose 8x8 cells all look alike encodes to a constant latent and decodes flat.
    The world's textures must differ from cell to cell; a plain background does not."""
    def largest_cell_difference(background_kind):
        img = world.render(world.SceneSpec((), background_kind, "yellow")).image.astype(np.float32)
        cells = img.reshape(8, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(64, -1)
        return np.abs(cells - cells[0]).mean(1).max()

    assert largest_cell_difference("solid") == 0
    assert largest_cell_difference(kind) > 10
