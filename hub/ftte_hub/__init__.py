"""FTTE fleet hub: drives federated rounds over the fleet (and over simulated fleets)."""
