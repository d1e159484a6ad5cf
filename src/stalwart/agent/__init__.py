"""stalwart.agent"""
