"""Programs people run: device agent, operator and clinician CLI, local mesh launcher."""
