"""How many channels each group loses, budgets and allocation, the frozen Plan, the plan file."""
