"""Material made on the control machine: the PKI (CA and certificates) and the generated passwords."""
