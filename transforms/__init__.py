"""newsbeam's Beam stages. Each stage is a composite PTransform; per-element logic is a
small function or DoFn that can be tested without a pipeline."""
