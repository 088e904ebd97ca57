"""Test-only ComfyUI nodes for the joint-attention tests, registered in the test process only.

They hand in-memory objects to API-format graphs (the small text encoders, the few-block SD3.5
model, masks) and install the pack's joint-attention hook on a model clone, optionally after a test override
and with a sink, so the graphs run through execution.PromptExecutor like any other."""
from __future__ import annotations


def register(nodes_module, objects: dict, hook_module) -> list[str]:
    """Add the test nodes to ComfyUI's node registry; `objects` maps names to what they return.
    Returns the node ids (to remove them again)."""

    class TestObject:
        CATEGORY = "astar_tests"
        FUNCTION = "get"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"name": ("STRING", {"default": ""})}}

        def get(self, name, **kwargs):
            return (objects[name],)

    class TestModel(TestObject):
        RETURN_TYPES = ("MODEL",)

    class TestClip(TestObject):
        RETURN_TYPES = ("CLIP",)

    class TestMask(TestObject):
        RETURN_TYPES = ("MASK",)

    class TestVAE(TestObject):
        RETURN_TYPES = ("VAE",)

    class TestJointHook:
        """Clone the model; put objects[capture] (a test override) in its transformer_options; install
        the pack's hook with `blocks` ("" = the defaults); put objects[sink] in CAPTURES_KEY."""
        CATEGORY = "astar_tests"
        FUNCTION = "apply"
        RETURN_TYPES = ("MODEL",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",), "blocks": ("STRING", {"default": ""}),
                                 "capture": ("STRING", {"default": ""}), "sink": ("STRING", {"default": ""}),
                                 "installs": ("INT", {"default": 1, "min": 1, "max": 3})}}

        def apply(self, model, blocks, capture, sink, installs, **kwargs):
            m = model.clone()
            options = m.model_options.setdefault("transformer_options", {})
            if capture:
                options[hook_module.OVERRIDE_KEY] = objects[capture]
            for _ in range(installs):
                hook_module.add_joint_attention_hook(m, blocks or None)
            if sink:
                options[hook_module.CAPTURES_KEY] = [objects[sink]]
            return (m,)

    class TestReplaceOverride:
        """Clone the model and put objects[override] in its transformer_options in place of the override
        there (a pack applied after A-STAR that does not chain to the override before it)."""
        CATEGORY = "astar_tests"
        FUNCTION = "apply"
        RETURN_TYPES = ("MODEL",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",), "override": ("STRING", {"default": ""})}}

        def apply(self, model, override, **kwargs):
            m = model.clone()
            m.model_options.setdefault("transformer_options", {})[hook_module.OVERRIDE_KEY] = objects[override]
            return (m,)

    added = {"AStarTestModel": TestModel, "AStarTestClip": TestClip, "AStarTestMask": TestMask, "AStarTestVAE": TestVAE,
             "AStarTestJointHook": TestJointHook, "AStarTestReplaceOverride": TestReplaceOverride}
    nodes_module.NODE_CLASS_MAPPINGS.update(added)
    return list(added)


def unregister(nodes_module, ids) -> None:
    for node_id in ids:
        nodes_module.NODE_CLASS_MAPPINGS.pop(node_id, None)
