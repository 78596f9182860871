"""Process supervision: one vocabulary of states, a pure restart policy and the embedded backend."""
