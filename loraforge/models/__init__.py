"""Model families, loading, kohya naming, prompt encoding and the built-in tiny models.

Modules (import the one you need; only ``naming``, ``sgm``, ``families`` and ``configs`` are
free of torch/diffusers imports at module level):

* ``naming``      kohya LoRA names (``unet_lora_name``, ``text_encoder_lora_name``,
                  ``module_path_for_lora_name``, ``lora_targets``, ``block_index``)
* ``sgm``         diffusers <-> SGM/LDM UNet module paths
* ``transformer_naming`` / ``transformer_layouts``  FLUX/SD3 kohya names (sd-scripts' BFL/SAI
                  layouts) and the diffusers layers (with row bands of fused layers) they feed
* ``families``    sd1/sd2/sd2-v/sdxl facts and detection; ``architecture_config_dir``
* ``loading``     ``load_model(...) -> LoadedModel``
* ``single_file`` reading checkpoints safely, writing the original layout
* ``prompts``     ``tokenize``, ``encode_prompts``, ``sdxl_time_ids``
* ``tiny``        ``write_tiny_model``, ``write_tiny_single_file``
"""
