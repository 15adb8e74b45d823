"""arithmetic of the seed papers' methods; targets/ and mask policies bind it"""
