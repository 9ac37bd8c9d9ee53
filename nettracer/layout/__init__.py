"""Struct layouts: the field catalogue, Offsets profiles (BTF or guessed), the guesser."""
