"""stalwart.checkpoint"""
