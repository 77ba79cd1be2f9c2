"""The synthesis service: GradOP+ and SDEdit from scribbles, ISA-DCA variations."""
