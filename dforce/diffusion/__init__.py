"""The mathematics of per-frame noise: schedules and parameterisations, scheduling matrices, trajectory
weightings over the noise-level cube, sampler steps, the guided denoiser over finished frames, rollouts,
the weighted denoising loss and the likelihoods. Above `models` and `data`: it calls a `Backbone` on
`Text`."""
