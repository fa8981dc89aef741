"""What a soup is compared with or checked against, not soups themselves: the output ensemble (K forward passes
per example, registered beside the methods so the evaluation treats it alike) and the basin diagnostic."""
