"""stalwart.job"""
