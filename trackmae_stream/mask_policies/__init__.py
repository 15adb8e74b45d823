"""Learned mask policies (registered with `trackmae_stream.masking.register_mask_policy` on import): `adamae`
(AdaMAE's sampler, trained through the MAE loss) and `tats_ref` (the TATS-style PPO sampler, SPEC §3.4, our reference
design). The arithmetic lives in `trackmae_stream.methods`; these modules bind it to the policy interface."""
