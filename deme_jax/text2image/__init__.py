"""Text-to-image: prompts -> CLIP text states -> guided latent sampling -> VAE decode."""
