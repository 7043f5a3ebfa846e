"""csg_jax: Conditional Score Guidance for text-driven image-to-image translation, in JAX/Flax."""

__version__ = "0.1.0"

__all__ = ["load_pipeline", "Pipeline", "EditConfig", "translate_image", "Editor", "EditResult"]


def __getattr__(name):  # lazy: `import csg_jax` stays cheap and torch-free
    if name in ("load_pipeline", "Pipeline"):
        from csg_jax import pipeline

        return getattr(pipeline, name)
    if name == "EditConfig":
        from csg_jax.editing.config import EditConfig

        return EditConfig
    if name in ("translate_image", "Editor", "EditResult"):
        from csg_jax.editing import editor

        return getattr(editor, name)
    raise AttributeError(f"module 'csg_jax' has no attribute {name!r}")
