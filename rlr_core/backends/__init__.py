"""Models behind one interface (:class:`base.DiffusionBackend`): the built-in ShapesWorld model and
diffusers latent pipelines. The sampler, the estimators and the app see only the interface."""
