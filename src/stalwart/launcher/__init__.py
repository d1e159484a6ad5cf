"""stalwart.launcher"""
