# ruff: noqa: E501  (the tables below: one name, one line)
"""Every public name and every command-line flag has a test that asserts a value.

``PUBLIC`` and ``FLAGS`` map each name (``nflax.__all__``, the ``__all__`` of the packages
``nflax.bijections`` and ``nflax.runs``, and every function and class defined in a public
module: those of ``nflax.__all__``, ``nflax.parallel`` and ``nflax.training``) and each flag
of ``nflax.cli.build_parser()`` to the tests that check it. The table is checked both ways: a
new name or flag without an entry fails here, and so does an entry whose test is gone or does
not mention what it claims to cover (its source, the helpers and fixtures of its file it uses,
and its file's constants are searched).
"""

import argparse
import ast
import importlib
import inspect
import re
import types
from functools import cache
from pathlib import Path

import pytest

import nflax
from nflax.cli import build_parser

TESTS = Path(__file__).resolve().parent
# public, though not re-exported in nflax.__all__
EXTRA_MODULES = ["image_data", "parallel", "training", "flow_matching", "vector_fields"]
PACKAGES = ["bijections", "runs"]  # public through their __all__

PUBLIC = {
    # nflax
    "nflax.ConditionalDiagNormal": ["test_distributions.py::test_conditional_diag_normal_log_prob_is_exact"],
    "nflax.Flow": ["test_distributions.py::test_flow_log_prob_of_known_affine_maps_is_exact"],
    "nflax.FlowMatchingHistory": ["test_flow_matching.py::test_fit_flow_matching_learns_validates_and_records_the_exact_nll"],
    "nflax.History": ["test_plotting.py::test_plot_history_lines"],
    "nflax.StandardNormal": ["test_distributions.py::test_standard_normal_log_prob_is_exact"],
    "nflax.VIHistory": ["test_plotting.py::test_plot_elbo_lines"],
    "nflax.evaluate": ["test_metrics.py::test_evaluate_a_standard_normal_flow_is_exact"],
    "nflax.fit": ["test_training.py::test_fit_learns_and_reports", "test_training.py::test_ragged_last_batch_is_masked_and_nothing_recompiles"],
    "nflax.fit_dequantized": ["test_dequantization.py::test_uniform_dequantized_fit_on_digits_beats_the_uniform_levels", "test_dequantization.py::test_variational_dequantization_trains_both_flows_and_gives_a_finite_bound"],
    "nflax.fit_flow_matching": ["test_flow_matching.py::test_fit_flow_matching_learns_validates_and_records_the_exact_nll", "test_flow_matching.py::test_exact_resume_and_same_key_same_parameters"],
    "nflax.fit_vi": ["test_vi.py::test_correlated_gaussian_mean_and_covariance_are_recovered"],
    "nflax.load": ["test_checkpoint.py::test_save_load_round_trip_is_bit_exact"],
    "nflax.nll": ["test_training.py::test_nll_in_batches_smaller_than_the_data"],
    "nflax.save": ["test_checkpoint.py::test_save_load_round_trip_is_bit_exact"],
    # nflax.bijections
    "nflax.bijections.ActNorm": ["test_normalization.py::test_actnorm_init_normalises_the_first_batch_and_only_once"],
    "nflax.bijections.AdditiveCoupling": ["test_coupling.py::test_additive_coupling_preserves_volume_and_passes_the_mask_through"],
    "nflax.bijections.AdditiveTransformer": ["test_transformers.py::test_additive_and_spline_transformers", "test_transformers.py::test_transformer_round_trip_and_log_derivative"],
    "nflax.bijections.Affine": ["test_catalogue.py::test_affine_formula_and_errors"],
    "nflax.bijections.AffineCoupling": ["test_bijections.py::test_coupling_starts_at_identity_and_bounds_scale"],
    "nflax.bijections.AffineTransformer": ["test_transformers.py::test_affine_transformer_formula_and_bound"],
    "nflax.bijections.BatchNorm": ["test_normalization.py::test_batchnorm_eval_mode_uses_running_averages_and_is_exact", "test_training.py::test_batchnorm_is_trained_by_fit_and_left_in_evaluation_mode"],
    "nflax.bijections.Bijection": ["test_bijections.py::test_contract"],
    "nflax.bijections.Buffer": ["test_catalogue.py::test_permute_and_reverse"],
    "nflax.bijections.Chain": ["test_bijections.py::test_stack_equals_chain", "test_distributions.py::test_flow_log_prob_of_known_affine_maps_is_exact"],
    "nflax.bijections.ContinuousFlow": ["test_continuous.py::test_a_linear_field_is_the_matrix_exponential_and_hutchinson_noise_is_fixed_per_solve", "test_continuous.py::test_trajectory_at_chosen_times_and_layer_names"],
    "nflax.bijections.Coupling": ["test_transformers.py::test_coupling_takes_any_transformer", "test_transformers.py::test_an_all_ones_mask_is_rejected"],
    "nflax.bijections.DataInit": ["test_normalization.py::test_actnorm_init_normalises_the_first_batch_and_only_once"],
    "nflax.bijections.Invert": ["test_made.py::test_maf_inverse_is_exact_and_iaf_swaps_directions"],
    "nflax.bijections.LULinear": ["test_catalogue.py::test_lu_linear_identity_at_init_and_log_det_matches_slogdet"],
    "nflax.bijections.LeakyReLU": ["test_bijections.py::test_leaky_relu_tutorial_init"],
    "nflax.bijections.Logit": ["test_catalogue.py::test_squashing_layers_on_their_natural_domains"],
    "nflax.bijections.MaskedAutoregressive": ["test_made.py::test_maf_inverse_is_exact_and_iaf_swaps_directions"],
    "nflax.bijections.Permute": ["test_catalogue.py::test_permute_and_reverse"],
    "nflax.bijections.Planar": ["test_catalogue.py::test_planar_constraint_holds_for_any_parameters"],
    "nflax.bijections.Radial": ["test_catalogue.py::test_radial_constraint_and_far_points"],
    "nflax.bijections.Reverse": ["test_catalogue.py::test_permute_and_reverse"],
    "nflax.bijections.Sigmoid": ["test_catalogue.py::test_squashing_layers_on_their_natural_domains"],
    "nflax.bijections.SplineCoupling": ["test_splines.py::test_layers_start_at_identity", "test_splines.py::test_spline_layer_errors"],
    "nflax.bijections.SplineTransformer": ["test_transformers.py::test_additive_and_spline_transformers", "test_transformers.py::test_transformers_compare_by_value_so_layers_stack"],
    "nflax.bijections.Stack": ["test_bijections.py::test_stack_equals_chain"],
    "nflax.bijections.Tanh": ["test_catalogue.py::test_squashing_layers_on_their_natural_domains"],
    "nflax.bijections.Transformer": ["test_transformers.py::test_a_new_transformer_is_one_class"],
    "nflax.bijections.alternating_mask": ["test_coupling.py::test_masks_are_binary_and_complementary"],
    "nflax.bijections.half_mask": ["test_coupling.py::test_masks_are_binary_and_complementary"],
    "nflax.bijections.num_spline_params": ["test_splines.py::test_parameter_shape_errors"],
    "nflax.bijections.random_mask": ["test_coupling.py::test_random_masks_differ_between_keys"],
    "nflax.bijections.rq_spline_forward": ["test_splines.py::test_zero_parameters_are_the_identity"],
    "nflax.bijections.rq_spline_inverse": ["test_splines.py::test_round_trip_within_float32_conditioning"],
    "nflax.bijections.rq_spline_log_derivative": ["test_splines.py::test_log_derivative_matches_autodiff"],
    "nflax.bijections.Invertible1x1Conv": ["test_image_flows.py::test_layer_formulas"],
    "nflax.bijections.MultiScale": ["test_image_flows.py::test_multiscale_is_one_bijection_image_to_vector", "test_image_flows.py::test_shape_changing_composition_rules"],
    "nflax.bijections.Squeeze": ["test_image_flows.py::test_layer_formulas", "test_image_flows.py::test_shape_changing_composition_rules"],
    "nflax.bijections.channel_mask": ["test_image_flows.py::test_layer_formulas"],
    "nflax.bijections.checkerboard_mask": ["test_image_flows.py::test_layer_formulas"],
    # nflax.checkpoint
    "nflax.checkpoint.CheckpointError": ["test_checkpoint.py::test_load_errors"],
    "nflax.checkpoint.TrainingCheckpoints": ["test_cli_flags.py::test_dataset_leaky_relu_no_actnorm_batch_size"],
    "nflax.checkpoint.load": ["test_checkpoint.py::test_save_load_round_trip_is_bit_exact"],
    "nflax.checkpoint.read_spec": ["test_checkpoint.py::test_read_spec_returns_the_constructor_and_its_arguments"],
    "nflax.checkpoint.save": ["test_checkpoint.py::test_save_replaces_atomically_and_leaves_no_temporaries"],
    # nflax.datasets
    "nflax.datasets.ConditionalDataset": ["test_datasets.py::test_dataset_classes_wrap_a_sampler_and_a_density"],
    "nflax.datasets.Dataset": ["test_datasets.py::test_dataset_classes_wrap_a_sampler_and_a_density"],
    "nflax.datasets.Target": ["test_datasets.py::test_dataset_classes_wrap_a_sampler_and_a_density"],
    "nflax.datasets.correlated_gaussian": ["test_vi.py::test_correlated_gaussian_in_three_dimensions_is_exact"],
    "nflax.datasets.correlated_gaussian_moments": ["test_vi.py::test_correlated_gaussian_in_three_dimensions_is_exact"],
    "nflax.datasets.get": ["test_datasets.py::test_banana_log_prob_is_the_closed_form"],
    "nflax.datasets.get_conditional": ["test_datasets.py::test_conditional_banana_log_prob_is_the_closed_form"],
    "nflax.datasets.get_target": ["test_vi.py::test_targets_have_the_right_shapes_and_normalisers"],
    "nflax.datasets.grid_log_normalizer": ["test_vi.py::test_targets_have_the_right_shapes_and_normalisers"],
    "nflax.datasets.names": ["test_datasets.py::test_moons_has_no_density_and_the_others_do"],
    "nflax.datasets.target_names": ["test_vi.py::test_targets_have_the_right_shapes_and_normalisers"],
    # nflax.dequantization
    "nflax.dequantization.Dequantized": ["test_dequantization.py::test_variational_dequantization_trains_both_flows_and_gives_a_finite_bound"],
    "nflax.dequantization.check_dequantizer": ["test_dequantization.py::test_bad_levels_and_settings_name_what_was_wrong"],
    "nflax.dequantization.check_levels": ["test_dequantization.py::test_bad_levels_and_settings_name_what_was_wrong"],
    "nflax.dequantization.check_num_levels": ["test_dequantization.py::test_bad_levels_and_settings_name_what_was_wrong"],
    "nflax.dequantization.fit_dequantized": ["test_dequantization.py::test_a_resumed_variational_run_equals_an_uninterrupted_one", "test_dequantization.py::test_uniform_dequantized_fit_on_digits_beats_the_uniform_levels", "test_dequantization.py::test_bad_levels_and_settings_name_what_was_wrong"],
    "nflax.dequantization.log_weights": ["test_dequantization.py::test_a_density_that_is_one_on_the_unit_cube_gives_log2_of_the_levels", "test_dequantization.py::test_importance_weighted_nll_converges_to_the_exact_cell_mass"],
    "nflax.dequantization.sample_noise": ["test_dequantization.py::test_variational_noise_is_in_the_unit_cube_and_its_density_integrates_to_one"],
    "nflax.dequantization.uniform_dequantize": ["test_dequantization.py::test_uniform_dequantize_stays_in_the_cell_of_each_level"],
    # nflax.distributions
    "nflax.distributions.compiled_log_prob": ["test_compile_once.py::test_compiled_sample_and_log_prob_compile_once_per_structure_and_shape"],
    "nflax.distributions.compiled_sample": ["test_compile_once.py::test_compiled_sample_and_log_prob_compile_once_per_structure_and_shape"],
    "nflax.distributions.ConditionalDiagNormal": ["test_distributions.py::test_conditional_diag_normal_log_prob_is_exact"],
    "nflax.distributions.DiagNormal": ["test_distributions.py::test_diag_normal_log_prob_is_exact"],
    "nflax.distributions.Distribution": ["test_distributions.py::test_a_subclassed_distribution_works_as_a_flow_base"],
    "nflax.distributions.Flow": ["test_distributions.py::test_flow_log_prob_of_known_affine_maps_is_exact"],
    "nflax.distributions.GaussianMixture": ["test_distributions.py::test_gaussian_mixture_component_log_probs_are_exact"],
    "nflax.distributions.StandardNormal": ["test_distributions.py::test_standard_normal_log_prob_is_exact"],
    "nflax.distributions.StudentT": ["test_distributions.py::test_log_probs_match_reference_formulas"],
    "nflax.distributions.Uniform": ["test_distributions.py::test_uniform_is_minus_inf_outside_the_box_and_samples_inside"],
    # nflax.flows
    "nflax.flows.cnf": ["test_continuous.py::test_maximum_likelihood_through_the_solver_with_finite_gradients_in_the_far_tail", "test_flow_matching.py::test_a_conditional_cnf_is_trained_with_its_context"],
    "nflax.flows.build": ["test_checkpoint.py::test_save_load_round_trip_is_bit_exact"],
    "nflax.flows.iaf": ["test_made.py::test_maf_inverse_is_exact_and_iaf_swaps_directions"],
    "nflax.flows.maf": ["test_made.py::test_maf_inverse_is_exact_and_iaf_swaps_directions"],
    "nflax.flows.nice": ["test_checkpoint.py::test_non_default_arguments_round_trip_bit_for_bit", "test_checkpoint.py::test_save_load_round_trip_is_bit_exact"],
    "nflax.flows.nsf": ["test_checkpoint.py::test_read_spec_returns_the_constructor_and_its_arguments", "test_checkpoint.py::test_save_load_round_trip_is_bit_exact"],
    "nflax.flows.planar": ["test_catalogue.py::test_planar_flow_samples_and_densities_agree"],
    "nflax.flows.realnvp": ["test_bijections.py::test_trajectory_matches_layers", "test_checkpoint.py::test_save_load_round_trip_is_bit_exact"],
    "nflax.flows.register": ["test_checkpoint.py::test_register_makes_a_constructor_buildable_and_loadable"],
    # nflax.flow_matching
    "nflax.flow_matching.FlowMatchingHistory": ["test_flow_matching.py::test_fit_flow_matching_learns_validates_and_records_the_exact_nll"],
    "nflax.flow_matching.default_flow_matching_optimizer": ["test_flow_matching.py::test_errors_and_the_default_optimizer"],
    "nflax.flow_matching.fit_flow_matching": ["test_flow_matching.py::test_fit_flow_matching_learns_validates_and_records_the_exact_nll"],
    "nflax.flow_matching.sinkhorn_pairing": ["test_flow_matching.py::test_minibatch_ot_pairing_and_a_one_device_mesh"],
    "nflax.flow_matching.split_continuous": ["test_flow_matching.py::test_errors_and_the_default_optimizer"],
    # nflax.metrics
    "nflax.metrics.evaluate": ["test_metrics.py::test_evaluate_with_the_exact_density_as_an_array_or_a_function", "test_metrics.py::test_evaluate_passes_the_context_to_the_flow_and_to_the_exact_density", "test_runs.py::test_run_train_returns_its_metrics_and_evaluate_reproduces_them"],
    "nflax.metrics.bits_per_dim": ["test_dequantization.py::test_a_density_that_is_one_on_the_unit_cube_gives_log2_of_the_levels"],
    "nflax.metrics.importance_weighted_nll": ["test_dequantization.py::test_importance_weighted_nll_converges_to_the_exact_cell_mass", "test_dequantization.py::test_a_density_that_is_one_on_the_unit_cube_gives_log2_of_the_levels"],
    # nflax.image_data
    "nflax.image_data.IDXError": ["test_image_data.py::test_idx_errors_name_the_file_and_the_problem"],
    "nflax.image_data.ImageData": ["test_image_data.py::test_digits_split_is_the_documented_permutation_and_levels_are_0_to_16"],
    "nflax.image_data.image_names": ["test_image_data.py::test_unknown_names_and_folders_are_named"],
    "nflax.image_data.load_images": ["test_image_data.py::test_unknown_names_and_folders_are_named", "test_image_data.py::test_mnist_idx_round_trip_gzip_or_not"],
    "nflax.image_data.mnist": ["test_image_data.py::test_mnist_idx_round_trip_gzip_or_not"],
    "nflax.image_data.read_idx": ["test_image_data.py::test_idx_of_other_types_and_the_dotted_names"],
    "nflax.image_data.read_mnist": ["test_image_data.py::test_mnist_idx_round_trip_gzip_or_not", "test_image_data.py::test_idx_errors_name_the_file_and_the_problem"],
    # nflax.nets
    "nflax.nets.MADE": ["test_made.py::test_made_is_autoregressive_in_degree_order"],
    "nflax.nets.MLP": ["test_conditional.py::test_embedding_network_is_trained"],
    "nflax.nets.get_activation": ["test_made.py::test_get_activation_by_name_and_the_cli_agrees"],
    "nflax.nets.MaskedLinear": ["test_made.py::test_masked_linear_multiplies_the_kernel_by_its_mask"],
    "nflax.nets.made_degrees": ["test_made.py::test_made_shapes_init_and_errors"],
    "nflax.nets.ConvResNet": ["test_image_flows.py::test_conv_resnet_keeps_the_image_size_and_starts_at_zero"],
    "nflax.nets.GlowConvNet": ["test_image_flows.py::test_glow_conv_net_is_3x3_then_1x1_then_3x3_and_starts_at_zero"],
    # nflax.parallel
    "nflax.parallel.batch_sharded": ["test_parallel_api.py::test_shardings_put_rows_and_shard_rows"],
    "nflax.parallel.data_size": ["test_parallel_api.py::test_make_mesh_data_size_and_resolve_mesh"],
    "nflax.parallel.gather_process_data": ["test_parallel_api.py::test_one_process_gather_primary_and_initialize_checks"],
    "nflax.parallel.initialize": ["test_parallel_api.py::test_one_process_gather_primary_and_initialize_checks", "test_parallel.py::test_argument_errors"],
    "nflax.parallel.is_explicit": ["test_parallel_api.py::test_shardings_put_rows_and_shard_rows"],
    "nflax.parallel.is_primary": ["test_parallel_api.py::test_one_process_gather_primary_and_initialize_checks"],
    "nflax.parallel.make_mesh": ["test_parallel_api.py::test_make_mesh_data_size_and_resolve_mesh"],
    "nflax.parallel.put_rows": ["test_parallel_api.py::test_shardings_put_rows_and_shard_rows"],
    "nflax.parallel.replicated": ["test_parallel_api.py::test_shardings_put_rows_and_shard_rows"],
    "nflax.parallel.resolve_mesh": ["test_parallel_api.py::test_make_mesh_data_size_and_resolve_mesh"],
    "nflax.parallel.shard_rows": ["test_parallel_api.py::test_shardings_put_rows_and_shard_rows"],
    # nflax.plotting
    "nflax.plotting.density_grid": ["test_plotting.py::test_density_grid_is_log_prob_on_the_grid"],
    "nflax.plotting.image_grid": ["test_plotting.py::test_image_grid_tiles_the_images_row_by_row"],
    "nflax.plotting.plot_conditional_density": ["test_conditional.py::test_conditional_density_grid_and_plot"],
    "nflax.plotting.plot_conditional_samples": ["test_plotting.py::test_plot_conditional_samples_one_panel_per_context"],
    "nflax.plotting.plot_density": ["test_plotting.py::test_plot_density_panels", "test_user_paths.py::test_one_dimensional_density_plot_is_the_curve_over_a_histogram"],
    "nflax.plotting.plot_elbo": ["test_plotting.py::test_plot_elbo_lines"],
    "nflax.plotting.plot_history": ["test_plotting.py::test_plot_history_lines"],
    "nflax.plotting.plot_pairs": ["test_plotting.py::test_plot_pairs_histograms_and_scatters"],
    "nflax.plotting.plot_samples": ["test_plotting.py::test_plot_samples_draws_the_flows_samples"],
    "nflax.plotting.plot_trajectory": ["test_plotting.py::test_plot_trajectory_panels_are_the_layers"],
    # nflax.runs
    "nflax.runs.DataSpec": ["test_runs.py::test_describe_data_gives_the_config_entries_of_each_source"],
    "nflax.runs.RunData": ["test_runs.py::test_load_run_data_standardises_a_file_and_holds_out_a_tenth"],
    "nflax.runs.RunError": ["test_runs.py::test_read_train_config_errors", "test_runs.py::test_process_block_splits_the_rows_evenly"],
    "nflax.runs.RunFolderError": ["test_user_paths.py::test_refused_claims_leave_the_folder_as_it_was", "test_runs.py::test_run_train_returns_its_metrics_and_evaluate_reproduces_them"],
    "nflax.runs.claim_run_folder": ["test_user_paths.py::test_refused_claims_leave_the_folder_as_it_was"],
    "nflax.runs.describe_data": ["test_runs.py::test_describe_data_gives_the_config_entries_of_each_source"],
    "nflax.runs.load_run_data": ["test_runs.py::test_load_run_data_standardises_a_file_and_holds_out_a_tenth", "test_runs.py::test_load_run_data_draws_a_built_in_or_conditional_set"],
    "nflax.runs.process_block": ["test_runs.py::test_process_block_splits_the_rows_evenly"],
    "nflax.runs.read_train_config": ["test_runs.py::test_read_train_config_errors", "test_runs.py::test_run_train_returns_its_metrics_and_evaluate_reproduces_them"],
    "nflax.runs.resume_train": ["test_runs.py::test_resume_train_of_a_finished_run_gives_the_same_metrics"],
    "nflax.runs.run_sample": ["test_runs.py::test_run_sample_writes_what_it_returns"],
    "nflax.runs.run_train": ["test_runs.py::test_run_train_returns_its_metrics_and_evaluate_reproduces_them"],
    "nflax.runs.run_vi": ["test_runs.py::test_run_vi_on_a_target_returns_what_it_writes"],
    "nflax.runs.vi_target": ["test_runs.py::test_run_vi_on_a_target_returns_what_it_writes"],
    # nflax.variables
    "nflax.variables.Buffer": ["test_variables.py::test_variables_is_a_leaf_and_the_old_paths_still_work", "test_variables.py::test_frozen_selects_buffers_and_data_init_only"],
    "nflax.variables.DataInit": ["test_variables.py::test_frozen_selects_buffers_and_data_init_only", "test_variables.py::test_data_init_flag"],
    "nflax.variables.in_training_mode": ["test_variables.py::test_training_mode_flag"],
    "nflax.variables.needs_data_init": ["test_variables.py::test_data_init_flag"],
    "nflax.variables.may_write_data_init": ["test_variables.py::test_data_init_flag"],
    # nflax.training
    "nflax.training.History": ["test_plotting.py::test_plot_history_lines"],
    "nflax.training.batch_indices": ["test_training.py::test_minibatch_epochs_visit_every_point_once"],
    "nflax.training.check_data": ["test_training.py::test_check_data_returns_float32_rows_or_names_the_problem"],
    "nflax.training.default_fit_optimizer": ["test_training_recipe.py::test_fit_default_optimizer_is_adamw"],
    "nflax.training.default_optimizer": ["test_training_recipe.py::test_weight_decay_shrinks_the_kernels_only"],
    "nflax.training.epoch_permutation": ["test_training.py::test_minibatch_epochs_visit_every_point_once"],
    "nflax.training.permutation": ["test_training.py::test_permutation_is_uniform"],
    "nflax.training.fit": ["test_training.py::test_fit_learns_and_reports", "test_training_recipe.py::test_the_flow_ends_with_the_bias_corrected_average_of_the_iterates"],
    "nflax.training.kernel_mask": ["test_training_recipe.py::test_weight_decay_shrinks_the_kernels_only"],
    "nflax.training.nll": ["test_training.py::test_nll_in_batches_smaller_than_the_data"],
    "nflax.training.warmup_cosine": ["test_training_recipe.py::test_warmup_cosine_is_nflax_trains_schedule"],
    # nflax.testing
    "nflax.testing.BijectionReport": ["test_testing.py::test_a_correct_layer_passes_and_the_report_holds_every_property"],
    "nflax.testing.Check": ["test_testing.py::test_a_correct_layer_passes_and_the_report_holds_every_property"],
    "nflax.testing.CheckError": ["test_testing.py::test_each_fault_is_caught_and_named_with_its_worst_point_and_error", "test_testing.py::test_check_flow_passes_a_correct_flow_and_catches_a_density_off_by_a_constant"],
    "nflax.testing.FlowReport": ["test_testing.py::test_check_flow_passes_a_correct_flow_and_catches_a_density_off_by_a_constant"],
    "nflax.testing.check_bijection": ["test_testing.py::test_each_fault_is_caught_and_named_with_its_worst_point_and_error", "test_bijections.py::test_contract", "test_bijections.py::test_image_contract"],
    "nflax.testing.check_flow": ["test_testing.py::test_check_flow_passes_a_correct_flow_and_catches_a_density_off_by_a_constant", "test_testing.py::test_check_flow_catches_a_base_off_by_a_constant_and_checks_each_context_row"],
    # nflax.vector_fields
    "nflax.vector_fields.VectorField": ["test_continuous.py::test_time_features_and_a_fresh_field_is_zero", "test_continuous.py::test_errors_name_the_layer_and_the_value"],
    "nflax.vector_fields.time_features": ["test_continuous.py::test_time_features_and_a_fresh_field_is_zero"],
    # nflax.vi
    "nflax.vi.VIHistory": ["test_plotting.py::test_plot_elbo_lines"],
    "nflax.vi.default_vi_optimizer": ["test_vi.py::test_default_vi_optimizer_is_adam_on_the_default_schedule"],
    "nflax.vi.default_vi_schedule": ["test_vi_defaults.py::test_default_schedule_warms_up_then_decays_to_zero"],
    "nflax.vi.check_log_density": ["test_vi.py::test_bad_log_density_is_rejected_before_compiling"],
    "nflax.vi.fit_vi": ["test_vi.py::test_correlated_gaussian_mean_and_covariance_are_recovered"],
    "nflax.vi.importance_diagnostics": ["test_vi.py::test_importance_diagnostics"],
    "nflax.vi.vi_diagnostics": ["test_vi.py::test_energy1_with_stick_the_landing_gets_half_the_samples_effective"],
}  # fmt: skip

FLAGS = {
    "train --activation": ["test_cli_flags.py::test_dataset_leaky_relu_no_actnorm_batch_size"],
    "train --batch-size": ["test_cli_flags.py::test_dataset_leaky_relu_no_actnorm_batch_size"],
    "train --checkpoint-every": ["test_checkpoint.py::test_kill_during_a_checkpoint_write_then_resume_equals_an_uninterrupted_run"],
    "train --conditional": ["test_cli.py::test_conditional_run"],
    "train --coordinator": ["test_cli_flags.py::test_flags_that_do_not_go_together_exit_2"],
    "train --data": ["test_checkpoint.py::test_data_file_run_samples_in_original_units"],
    "train --data-dir": ["test_cli_images.py::test_mnist_from_an_idx_folder"],
    "train --dataset": ["test_cli_flags.py::test_dataset_leaky_relu_no_actnorm_batch_size"],
    "train --depth": ["test_cli_images.py::test_glow_on_digits_writes_every_file_and_reconstructs_exactly"],
    "train --dequantization": ["test_cli_images.py::test_variational_dequantization_run_saves_its_noise_flow"],
    "train --devices": ["test_cli_flags.py::test_devices_all_trains_the_same_model"],
    "train --embedding": ["test_cli.py::test_conditional_run"],
    "train --flow": ["test_flows.py::test_cli_trains_every_flow"],
    "train --hidden": ["test_cli_flags.py::test_dataset_leaky_relu_no_actnorm_batch_size"],
    "train --iw-samples": ["test_cli_images.py::test_glow_on_digits_writes_every_file_and_reconstructs_exactly"],
    "train --layers": ["test_cli_flags.py::test_dataset_leaky_relu_no_actnorm_batch_size"],
    "train --levels": ["test_cli_images.py::test_glow_on_digits_writes_every_file_and_reconstructs_exactly"],
    "train --leaky-relu": ["test_cli_flags.py::test_dataset_leaky_relu_no_actnorm_batch_size"],
    "train --lr": ["test_cli_flags.py::test_patience_and_val_fraction"],
    "train --no-actnorm": ["test_cli_flags.py::test_dataset_leaky_relu_no_actnorm_batch_size"],
    "train --no-cache": ["test_compile_once.py::test_no_cache_flag_and_environment_variable_turn_the_cache_off"],
    "train --no-early-stopping": ["test_cli_flags.py::test_dataset_leaky_relu_no_actnorm_batch_size"],
    "train --no-plots": ["test_cli_flags.py::test_dataset_leaky_relu_no_actnorm_batch_size"],
    "train --objective": ["test_flow_matching.py::test_cli_objective_is_flow_matching_for_cnf_by_default_and_only_for_it", "test_flow_matching.py::test_cli_trains_a_cnf_by_flow_matching_with_every_figure"],
    "train --num-points": ["test_cli_flags.py::test_patience_and_val_fraction"],
    "train --num-processes": ["test_cli_flags.py::test_flags_that_do_not_go_together_exit_2"],
    "train --out": ["test_cli.py::test_non_empty_run_folder_is_not_touched"],
    "train --patience": ["test_cli_flags.py::test_patience_and_val_fraction"],
    "train --process-id": ["test_cli_flags.py::test_flags_that_do_not_go_together_exit_2"],
    "train --quiet": ["test_cli_flags.py::test_patience_and_val_fraction"],
    "train --resume": ["test_checkpoint.py::test_kill_during_a_checkpoint_write_then_resume_equals_an_uninterrupted_run"],
    "train --schedule": ["test_cli_flags.py::test_schedule_warmup_starts_at_rate_zero_constant_does_not"],
    "train --seed": ["test_cli_flags.py::test_seed_same_seed_same_run_other_seed_other_run"],
    "train --steps": ["test_cli_flags.py::test_dataset_leaky_relu_no_actnorm_batch_size"],
    "train --val-fraction": ["test_cli_flags.py::test_patience_and_val_fraction"],
    "train --weight-decay": ["test_cli_flags.py::test_weight_decay_changes_the_updates_only"],
    "sample run": ["test_cli.py::test_sample_from_a_run"],
    "sample -n/--num": ["test_cli.py::test_sample_from_a_run"],
    "sample -o/--output": ["test_cli.py::test_sample_from_a_run"],
    "sample --no-cache": ["test_compile_once.py::test_no_cache_flag_and_environment_variable_turn_the_cache_off"],
    "sample --seed": ["test_cli_flags.py::test_sample_seed"],
    "vi --activation": ["test_cli_flags.py::test_vi_dim"],
    "vi --dim": ["test_cli_flags.py::test_vi_dim"],
    "vi --flow": ["test_cli_flags.py::test_vi_flow_lr_seed_no_plots"],
    "vi --hidden": ["test_cli_flags.py::test_vi_flow_lr_seed_no_plots"],
    "vi --layers": ["test_cli_flags.py::test_vi_flow_lr_seed_no_plots"],
    "vi --leaky-relu": ["test_cli_flags.py::test_flags_that_do_not_go_together_exit_2"],
    "vi --no-cache": ["test_compile_once.py::test_no_cache_flag_and_environment_variable_turn_the_cache_off"],
    "vi --lr": ["test_cli_flags.py::test_vi_flow_lr_seed_no_plots"],
    "vi --no-plots": ["test_cli_flags.py::test_vi_flow_lr_seed_no_plots"],
    "vi --num-samples": ["test_cli_flags.py::test_vi_flow_lr_seed_no_plots", "test_vi.py::test_cli_vi_writes_its_files"],
    "vi --out": ["test_vi.py::test_cli_vi_writes_its_files"],
    "vi --quiet": ["test_cli_flags.py::test_vi_dim"],
    "vi --seed": ["test_cli_flags.py::test_vi_flow_lr_seed_no_plots"],
    "vi --steps": ["test_vi.py::test_cli_vi_writes_its_files"],
    "vi --stick-the-landing": ["test_vi.py::test_cli_vi_writes_its_files"],
    "vi --target": ["test_vi.py::test_cli_vi_writes_its_files"],
}  # fmt: skip


def public_names() -> set[str]:
    names = {f"nflax.{n}" for n in nflax.__all__}
    modules = {n for n in nflax.__all__ if isinstance(getattr(nflax, n), types.ModuleType)}
    names -= {f"nflax.{m}" for m in modules}  # a module stands for its names, below
    for package in PACKAGES:
        names |= {
            f"nflax.{package}.{n}" for n in importlib.import_module(f"nflax.{package}").__all__
        }
    for m in sorted(modules - set(PACKAGES)) + EXTRA_MODULES:
        mod = importlib.import_module(f"nflax.{m}")
        for n, obj in vars(mod).items():
            defined_here = getattr(obj, "__module__", None) == mod.__name__
            if (
                not n.startswith("_")
                and defined_here
                and inspect.isfunction(obj) | inspect.isclass(obj)
            ):
                names.add(f"nflax.{m}.{n}")
    return names


def cli_flags() -> dict[str, list[str]]:
    """``"command flag"`` → the option strings (or the positional's name)."""
    out = {}
    for action in build_parser()._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for command, sub in action.choices.items():
            for a in sub._actions:
                if isinstance(a, argparse._HelpAction):
                    continue
                strings = a.option_strings or [a.dest]
                # --x/--no-x (BooleanOptionalAction) is one flag, named by its positive form
                named = [s for s in strings if not s.startswith("--no-")] or strings
                out[f"{command} {'/'.join(named)}"] = strings
    return out


@cache
def _sources(filename: str) -> dict[str, str]:
    """Each test of a file → the text it is judged by: its source with decorators, the
    module-level code of its file (constants, parameter tables) and the source of the file's
    functions it uses, directly or through other functions (helpers, fixtures)."""
    src = (TESTS / filename).read_text()
    tree = ast.parse(src)
    lines = src.splitlines()

    def text(node):
        start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
        return "\n".join(lines[start - 1 : node.end_lineno])

    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    module_code = "\n".join(
        text(n) for n in tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)
    )

    def used(node):
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        names |= {a.arg for a in node.args.args}  # fixtures
        return names & functions.keys()

    out = {}
    for name in functions:
        if not name.startswith("test_"):
            continue
        seen, todo = {name}, [name]
        while todo:
            for dep in used(functions[todo.pop()]) - seen:
                seen.add(dep)
                todo.append(dep)
        out[name] = "\n".join([module_code, *(text(functions[n]) for n in sorted(seen))])
    return out


def _check_entries(table, mentions):
    problems = []
    for key, tests in sorted(table.items()):
        if not tests:
            problems.append(f"{key}: no test")
        for ref in tests:
            filename, _, test = ref.partition("::")
            if not (TESTS / filename).is_file() or test not in _sources(filename):
                problems.append(f"{key}: {ref} does not exist")
            elif not mentions(key, _sources(filename)[test]):
                problems.append(f"{key}: {ref} does not mention it")
    return problems


def test_every_public_name_has_a_test_in_the_table():
    names = public_names()
    missing, stale = sorted(names - PUBLIC.keys()), sorted(PUBLIC.keys() - names)
    assert not missing, f"public names without a test in PUBLIC: {missing}"
    assert not stale, f"PUBLIC lists names that are not public (any more): {stale}"


def test_every_cli_flag_has_a_test_in_the_table():
    flags = cli_flags()
    missing, stale = sorted(flags.keys() - FLAGS.keys()), sorted(FLAGS.keys() - flags.keys())
    assert not missing, f"flags without a test in FLAGS: {missing}"
    assert not stale, f"FLAGS lists flags the parser does not have (any more): {stale}"


def _mentions_name(name, source):
    return re.search(rf"\b{re.escape(name.rsplit('.', 1)[-1])}\b", source) is not None


@pytest.mark.parametrize(
    "table, mentions",
    [
        (PUBLIC, _mentions_name),
        (
            FLAGS,
            lambda key, source: (
                any(
                    f'"{s}"' in source or f"'{s}'" in source
                    for s in cli_flags().get(key, [])
                    if s.startswith("-")
                )
                or (key == "sample run" and '"sample"' in source)
            ),  # a positional
        ),
    ],
    ids=["names", "flags"],
)
def test_every_test_in_the_table_exists_and_mentions_what_it_covers(table, mentions):
    problems = _check_entries(table, mentions)
    assert not problems, "\n".join(problems)
